"""A training step's frozen products on cpu_native's C kernel (spt_fast/model/cpu_linear.py):
values and gradients against PyTorch's, what it leaves alone, and the shared layout's whole
step with the C kernels against the same step without them."""
import json

import pytest
import torch
import torch.nn.functional as F

from spt_fast.data.batch import collate
from spt_fast.data.text import Encoder
from spt_fast.model import cpu_linear, cpu_native
from spt_fast.model.build import build_spt_model
from spt_fast.model.spt import SPTConfig

pytestmark = pytest.mark.skipif(not cpu_native.dense_vector_path(torch.float32),
                                reason="the CPU kernels (their AVX-512 paths) are not built here")

DTYPES = [torch.float32] + ([torch.bfloat16] if cpu_native.dense_applies(torch.zeros(16, 8, dtype=torch.bfloat16))
                            else [])


def _routed(y) -> bool:
    return type(y.grad_fn).__name__ == "_FrozenLinearBackward"


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_linear_equals_torch_in_values_and_gradients(dtype):
    torch.manual_seed(0)
    w = (torch.randn(80, 96) / 96 ** 0.5).to(dtype)
    x = torch.randn(3, 40, 96).to(dtype).requires_grad_()
    with cpu_linear.native_linears():
        y = F.linear(x, w)
    assert _routed(y) and y.shape == (3, 40, 80) and y.dtype == dtype
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    want_y = x.detach().double() @ w.double().t()
    want_dx = dy.double() @ w.double()
    # fp32: the sums' order only; bf16: the output rounded once (half an ulp, 2^-9 relative)
    rtol = 0 if dtype == torch.float32 else 2 ** -8
    for got, want in ((y, want_y), (dx, want_dx)):
        torch.testing.assert_close(got.detach().double(), want, atol=1e-5 * want.abs().max().item(), rtol=rtol)


def test_native_linear_leaves_what_it_does_not_serve():
    torch.manual_seed(0)
    w, b, x = torch.randn(48, 64), torch.randn(48), torch.randn(100, 64, requires_grad=True)
    trainable = torch.randn(48, 64, requires_grad=True)
    with cpu_linear.native_linears():
        assert _routed(F.linear(x, w))
        assert not _routed(F.linear(x, w, b))  # a bias
        assert not _routed(F.linear(x, trainable))  # a weight that takes a gradient
        assert not _routed(F.linear(x[:cpu_linear.MIN_ROWS - 1], w))  # too few rows
        assert not _routed(F.linear(torch.randn(100, 40, requires_grad=True), torch.randn(40, 40)))  # 40 outputs
    assert not _routed(F.linear(x, w))  # outside the block
    with cpu_linear.native_linears(False):
        assert not _routed(F.linear(x, w))


@pytest.mark.parametrize("layout, checkpointed", [("shared", False), ("shared", True)])
def test_a_step_with_the_c_kernels_equals_the_torch_step(layout, checkpointed, char_tok, tiny_llama, monkeypatch):
    """A training step's loss and gradients with every frozen product (and, shared, the context
    pass's attention) on the C kernels equal those of the same step on PyTorch's (fp32, tight),
    also with the branch layers recomputed in the backward (which must recompute on the same
    kernels: else the saved tensors differ and torch.utils.checkpoint refuses)."""
    from spt_fast.data.corpora import Sample

    monkeypatch.setattr(cpu_linear, "MIN_ROWS", 1)  # the tiny batch's branches too
    samples = [Sample(("i like cats.", "i am tall."), ("hi there", "hello!", "how are you?"), "great, thanks.", "d0", 1),
               Sample(("i drive a bus.",), ("hey", "yo", "any pets?"), "too busy driving all day long.", "d1", 2)]
    cfg = SPTConfig(num_prompts=3, prompt_len=4, layout=layout, init="random", lambda_sel=0.7, lambda_ctr=0.3)
    spt = build_spt_model(tiny_llama, cfg)
    if checkpointed:
        spt.set_activation_checkpointing(True)
    enc = Encoder(char_tok, cfg.max_len, cfg.prompt_len)
    batch = collate([enc.encode(s) for s in samples], char_tok.pad_token_id, char_tok.bos_token_id)
    params = [spt.prompts.weight, spt.retriever.proj.weight]
    results, calls = [], []
    real = cpu_native.dense_mm_rowmajor
    monkeypatch.setattr(cpu_native, "dense_mm_rowmajor", lambda *a, **k: calls.append(1) or real(*a, **k))
    for native in (False, True):
        spt._kernels_for = torch.float32  # the choice made here, not measured
        spt._native_linears = native
        if layout == "shared":
            spt.fast.native_prefill_attention = native
        n0 = len(calls)
        out = spt(batch)
        results.append((out["loss"].detach(), *torch.autograd.grad(out["loss"], params)))
        assert (len(calls) > n0) == native
    for torch_run, native_run in zip(*results):
        assert torch_run.abs().max() > 0
        torch.testing.assert_close(native_run, torch_run, rtol=1e-5, atol=1e-7)


def test_column_major_weights_and_bad_inputs():
    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(70, 64)
    col = w.t().contiguous().t()  # the same values, stored column-major (as column_major_linears leaves them)
    assert not col.is_contiguous()
    torch.testing.assert_close(cpu_native.dense_mm_rowmajor(x, col), cpu_native.dense_mm_rowmajor(x, w),
                               rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="dense_mm_rowmajor"):
        cpu_native.dense_mm_rowmajor(torch.randn(70, 60), w)  # widths differ
    with pytest.raises(ValueError, match="dense_mm_rowmajor"):
        cpu_native.dense_mm_rowmajor(x.double(), w.double())
    q = cpu_native.pack_int4(torch.randint(0, 16, (32, 64)))
    groups = cpu_native.pack_int4_groups(torch.ones(2, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="quant_prefill"):
        cpu_native.quant_prefill(x, q, groups, None, 32, 4)  # int4 without offsets
    with pytest.raises(ValueError, match="quant_prefill"):
        cpu_native.quant_prefill(torch.randn(70, 32), q, groups, groups, 32, 4)  # widths differ
    y = torch.randn(64, 100, requires_grad=True)
    with cpu_linear.native_linears():  # a non-contiguous input, and its gradient
        out = F.linear(y.t(), w)
    assert _routed(out)
    (dy,) = torch.autograd.grad(out.sum(), y)
    torch.testing.assert_close(dy, (torch.ones(100, 48) @ w).t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native_faster", [False, True])
def test_the_training_choice_is_measured_once_and_kept(tmp_path, monkeypatch, native_faster):
    from spt_fast.model import cpu_projections

    cache = tmp_path / "kernels.json"
    timed = []
    # torch's pass is timed first: seconds 2 then 1 make the C pass the faster one
    monkeypatch.setattr(cpu_projections, "best_time",
                        lambda fn, reps: timed.append(fn) or (3 - len(timed) if native_faster else len(timed)))
    first = cpu_linear.choose_training_linears([(48, 64), (64, 48)], torch.float32, cache)
    assert first is native_faster and len(timed) == 2
    assert any(k.startswith("training-linears|") for k in json.loads(cache.read_text()))
    again = cpu_linear.choose_training_linears([(64, 48), (48, 64)], torch.float32, cache)
    assert again is first and len(timed) == 2  # read back, not measured again
    assert cpu_linear.choose_training_linears([(40, 64)], torch.float32, cache) is False  # not servable
