"""4-bit NF4 base weights: structure, accuracy, and soft-prompt gradients (incl. the CPU repack trap).

Tolerances, and why:
  * fp32 compute vs `dequantized_copy`: both multiply by the same NF4-rounded fp32 weights, so
    they agree to fp32 round-off: loss rtol 1e-5, gradient atol 1e-7 + rtol 1e-4.
  * bf16 compute vs the fp32 dequantized copy: activations are rounded to bf16 (8 bits of mantissa)
    inside every 4-bit layer: loss within 1e-2 absolute, gradient max error <= 3e-2 of its max
    magnitude and cosine >= 0.999.
  * 4-bit vs the unquantized model: NF4 keeps ~3 significant bits per weight (relative weight error
    ~0.1 for Gaussian weights; 0.09 measured), so logits get relative L2 error <= 0.25 (0.11
    measured on the tiny Llama), cosine >= 0.97.
"""
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

bnb = pytest.importorskip("bitsandbytes")

from spt_fast.model import quant  # noqa: E402
from spt_fast.model.quant import dequantized_copy, guard_4bit, is_quantized, quantize_linear_layers  # noqa: E402
from spt_fast.testing import tiny_llama, tiny_opt  # noqa: E402

VOCAB = 104
N_VIRTUAL = 3


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (2, 11), generator=g)
    soft = torch.randn(2, N_VIRTUAL, 64, generator=g) * 0.02
    return ids, soft


def _soft_prompt_loss_and_grad(model, ids, soft):
    """Loss = CE on the last 6 tokens of [soft prompt ; token embeddings]; returns (loss, d loss/d soft)."""
    soft = soft.clone().requires_grad_(True)
    tokens = model.get_input_embeddings()(ids).detach()
    embeds = torch.cat([soft, tokens], dim=1)
    logits = model(inputs_embeds=embeds).logits
    # logits at position p predict token p+1; the last 6 tokens are the targets.
    n_target = 6
    pred = logits[:, -n_target - 1:-1].float()
    loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, -n_target:].reshape(-1))
    loss.backward()
    return loss.detach(), soft.grad


def _assert_grad_close_fp32(loss, grad, ref_loss, ref_grad):
    assert grad.abs().max() > 0, "soft-prompt gradient is zero"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def _assert_grad_close_bf16(model, ref, ids, soft):
    """bf16 compute: loss within 1e-2, gradient within 3% of its largest entry, cosine >= 0.999."""
    loss, grad = _soft_prompt_loss_and_grad(model, ids, soft)
    ref_loss, ref_grad = _soft_prompt_loss_and_grad(ref, ids, soft)
    assert grad.abs().max() > 0
    assert (loss - ref_loss).abs() < 1e-2
    assert (grad - ref_grad).abs().max() <= 3e-2 * ref_grad.abs().max()
    assert F.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) >= 0.999


def _linear4bit_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _packed(model):
    return [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _linear4bit_layers(model)]


# ----------------------------------------------------------------------------- structure

@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_quantize_replaces_linears_and_skips_lm_head(make):
    full = make()
    n_linear = sum(type(m) is nn.Linear for m in full.modules())
    model = quantize_linear_layers(make(), compute_dtype=torch.float32)
    assert is_quantized(model) and not is_quantized(full)
    layers = _linear4bit_layers(model)
    assert len(layers) == n_linear - 1  # everything but the head
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight.dtype == torch.float32
    if make is tiny_opt:  # tied head: still the very same tensor as the input embedding
        assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    for layer in layers:
        w = layer.weight
        assert isinstance(w, bnb.nn.Params4bit) and w.dtype == torch.uint8
        assert w.numel() * 2 == layer.in_features * layer.out_features  # two 4-bit codes per byte
        qs = w.quant_state
        assert qs.quant_type == "nf4" and qs.blocksize == 64 and qs.nested  # nested = double quant
        assert not w.requires_grad and (layer.bias is None or not layer.bias.requires_grad)
        assert layer.support_avx512bf16_for_cpu is False  # guarded on creation


def test_quantize_generic_tree_skip_and_subclasses():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(64, 128))
    model.add_module("attn", nn.MultiheadAttention(128, 4, batch_first=True))
    model.add_module("head", nn.Linear(128, 64))
    quantize_linear_layers(model, compute_dtype=torch.float32, skip=("head",))
    assert isinstance(model.proj, bnb.nn.Linear4bit)
    assert type(model.head) is nn.Linear
    # MultiheadAttention reads out_proj.weight directly, so its Linear subclass must stay as is.
    assert not isinstance(model.attn.out_proj, bnb.nn.Linear4bit)
    x = torch.randn(2, 5, 64)
    h = model.proj(x)
    out = model.head(model.attn(h, h, h)[0])
    assert out.shape == (2, 5, 64) and torch.isfinite(out).all()


def test_quantized_weights_and_logits_close_to_full_precision():
    full = tiny_llama()
    model = quantize_linear_layers(tiny_llama(), compute_dtype=torch.float32)
    ref = dequantized_copy(model)
    assert not is_quantized(ref) and is_quantized(model)  # the copy did not touch the original
    w = full.model.layers[0].mlp.up_proj.weight
    w_dq = ref.model.layers[0].mlp.up_proj.weight
    assert w_dq.dtype == torch.float32
    weight_err = (w_dq - w).norm() / w.norm()
    assert 0 < weight_err < 0.15  # really rounded, but only to NF4 precision

    ids, _ = _batch()
    with torch.no_grad():
        want = full(input_ids=ids).logits
        got = model(input_ids=ids).logits
    rel = (got - want).norm() / want.norm()
    cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert rel < 0.25 and cos > 0.97, (rel, cos)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_soft_prompt_grad_fp32_compute_matches_dequantized(make):
    model = quantize_linear_layers(make(), compute_dtype=torch.float32)
    ref = dequantized_copy(model)
    ids, soft = _batch()
    _assert_grad_close_fp32(*_soft_prompt_loss_and_grad(model, ids, soft), *_soft_prompt_loss_and_grad(ref, ids, soft))


def test_soft_prompt_grad_bf16_compute_matches_dequantized():
    model = quantize_linear_layers(tiny_llama(), compute_dtype=torch.bfloat16)
    ref = dequantized_copy(model)
    ids, soft = _batch()
    _assert_grad_close_bf16(model, ref, ids, soft)


def test_grad_after_eval_no_grad_forward():
    model = quantize_linear_layers(tiny_llama(), compute_dtype=torch.float32)
    ref = dequantized_copy(model)
    ids, soft = _batch(1)
    model.eval()
    guard_4bit(model)  # what the engine does after eval(); must be harmless to repeat
    with torch.no_grad():
        model(input_ids=ids)
    assert not any(_packed(model))
    _assert_grad_close_fp32(*_soft_prompt_loss_and_grad(model, ids, soft), *_soft_prompt_loss_and_grad(ref, ids, soft))


# ----------------------------------------------------------------------------- the avx512_bf16 trap
# This CPU has no avx512_bf16, so bitsandbytes' own probe says False. The trap is forced by patching
# that probe as Linear4bit sees it (bitsandbytes.nn.modules.has_avx512bf16, read in __init__ into
# `support_avx512bf16_for_cpu`). The AVX512-BF16 gemv kernel itself is registered only when the
# probe is true at bitsandbytes import, so here the repacked layers run the generic gemv_4bit, which
# reads the packed layout as if it were the standard one: logits and gradients both go wrong. On a
# real avx512_bf16 CPU the native kernel gives right logits but is opaque to autograd (torch warns
# "autograd kernel was not registered"), so the input-gradient through every layer is lost instead.
# Either way the repack is what breaks the gradient, and that is what is asserted.

@pytest.fixture
def cpu_claims_avx512_bf16(monkeypatch):
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def _eval_no_grad_forward(model, ids):
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)


@pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered")
def test_forced_trap_without_guard_breaks_gradient(cpu_claims_avx512_bf16, monkeypatch):
    monkeypatch.setattr(quant, "guard_4bit", lambda model: None)  # quantize without the guard
    model = quantize_linear_layers(tiny_llama(), compute_dtype=torch.float32)
    assert all(layer.support_avx512bf16_for_cpu for layer in _linear4bit_layers(model))
    ref = dequantized_copy(model)
    ids, soft = _batch(2)
    ref_loss, ref_grad = _soft_prompt_loss_and_grad(ref, ids, soft)

    _eval_no_grad_forward(model, ids)
    assert all(_packed(model))  # the repack happened, in place, on every layer
    _, grad = _soft_prompt_loss_and_grad(model, ids, soft)
    assert (grad - ref_grad).abs().max() > 0.2 * ref_grad.abs().max()  # silently wrong


def test_forced_trap_with_guard_keeps_gradient(cpu_claims_avx512_bf16):
    model = quantize_linear_layers(tiny_llama(), compute_dtype=torch.float32)
    ref = dequantized_copy(model)
    ids, soft = _batch(2)
    _eval_no_grad_forward(model, ids)
    assert not any(_packed(model))
    _assert_grad_close_fp32(*_soft_prompt_loss_and_grad(model, ids, soft), *_soft_prompt_loss_and_grad(ref, ids, soft))


def test_guard_undoes_a_repack_that_already_happened(cpu_claims_avx512_bf16, monkeypatch, caplog):
    monkeypatch.setattr(quant, "guard_4bit", lambda model: None)
    model = quantize_linear_layers(tiny_llama(), compute_dtype=torch.float32)
    ref = dequantized_copy(model)
    ids, soft = _batch(3)
    _eval_no_grad_forward(model, ids)
    assert all(_packed(model))
    monkeypatch.undo()  # the real guard again, and the real probe (irrelevant once guarded)

    guard_4bit(model)
    guard_4bit(model)  # idempotent
    assert not any(_packed(model)) and "already been repacked" in caplog.text
    assert all(layer.weight.quant_state.nested for layer in _linear4bit_layers(model))
    _eval_no_grad_forward(model, ids)
    assert not any(_packed(model))
    # The inverse repack is lossy (block scales went through bf16, then 8-bit double quant again),
    # so this is looser than the fp32 tolerance: 1% of the gradient's magnitude.
    loss, grad = _soft_prompt_loss_and_grad(model, ids, soft)
    ref_loss, ref_grad = _soft_prompt_loss_and_grad(ref, ids, soft)
    assert (loss - ref_loss).abs() < 1e-3
    assert (grad - ref_grad).abs().max() <= 1e-2 * ref_grad.abs().max()


def test_guard_on_unquantized_model_is_a_no_op():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guard_4bit(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nf4_kernel_view_equals_bitsandbytes_layers():
    """A compact-Llama view with the fused NF4 modules computes what the bitsandbytes layers do
    (fp32 compute: the same dequantized weights), for a prefill (> 16 rows: dequantize + matmul)
    and decode steps (<= 16 rows: the matmul kernel's op), and leaves the HF model's layers alone."""
    from spt_fast.model.llama import Llama

    model = quantize_linear_layers(tiny_llama(), compute_dtype=torch.float32)
    plain, fused = Llama.from_hf_modules(model), Llama.from_hf_modules(model)
    assert quant.attach_nf4_kernels(fused)
    assert isinstance(fused.layers[0].attention.wo, quant.NF4Fused)
    assert isinstance(plain.layers[0].attention.wo, bnb.nn.Linear4bit)
    assert isinstance(model.model.layers[0].self_attn.o_proj, bnb.nn.Linear4bit)
    x = torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = []
        for view in (plain, fused):
            caches = view.setup_caches(3, 16, torch.float32)
            view.prefill(x, caches)
            steps = [view.decode_one_token(torch.tensor([5, 6, 7]) + t, torch.tensor([9, 9, 9]) + t, caches)
                     for t in range(3)]
            outs.append((view(x), torch.stack(steps)))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)


def test_nf4_kernels_not_attached_to_unquantized_model():
    from spt_fast.model.llama import Llama

    view = Llama.from_hf_modules(tiny_llama())
    assert not quant.attach_nf4_kernels(view)
    assert view.layers[0].attention.fused_qkv is None


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_soft_prompt_grad_bf16_on_cuda():
    model = quantize_linear_layers(tiny_llama().cuda(), compute_dtype=torch.bfloat16)
    ref = dequantized_copy(model)
    ids, soft = _batch()
    ids, soft = ids.cuda(), soft.cuda()
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    _assert_grad_close_bf16(model, ref, ids, soft)


def test_preset_built_in_nf4_layer_by_layer_equals_quantizing_the_full_model():
    from spt_fast.model.loading import random_preset_model

    torch.manual_seed(123)
    direct = random_preset_model("tiny", torch.float32, "cpu", seed=5, load_4bit=True)
    full = quantize_linear_layers(random_preset_model("tiny", torch.float32, "cpu", seed=5), torch.float32)
    a, b = dict(direct.named_modules()), dict(full.named_modules())
    quantized = [n for n, m in a.items() if is_quantized(m) and not list(m.children())]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    for name in quantized:
        wa, wb = a[name].weight, b[name].weight
        assert torch.equal(wa.data, wb.data), name
        assert torch.equal(wa.quant_state.absmax, wb.quant_state.absmax), name
    for (na, pa), (nb, pb) in zip(direct.named_parameters(), full.named_parameters()):
        if pa.dtype != torch.uint8:
            assert na == nb and torch.equal(pa, pb), na


def test_memory_bench_split_adds_up_and_estimate_has_the_same_parts():
    from spt_fast.benchmarks.memory import estimate, measure_step

    row = measure_step("tiny", "shared", K=2, B=2, context_len=16, response_len=4, prompt_len=2, dtype="fp32",
                       device="cpu")
    m = row["measured"]
    assert m["baseline"] + m["weights"] + m["trainable"] + m["activations"] == m["step_peak"] <= m["peak"]
    assert m["trainable"] >= 0 and m["activations"] >= 0 and row["step_s"] > 0
    est = estimate("llama-2-7b", "shared", 4, 8, 256, 32, 1)
    assert est["total"] == est["weights"] + est["trainable"] + est["activations"]
    # NF4 with double quantization: about 0.52 bytes per quantized weight, plus the dense parts.
    assert 3.5 * 2 ** 30 < est["weights"] < 4.2 * 2 ** 30
    # The shared layout's activations do not grow with K x context: a longer context costs the same
    # whatever K (the context is held once); in the prefix layout it costs K times as much.
    def extra_context(layout, K, checkpointing=False):
        return (estimate("llama-2-7b", layout, K, 8, 512, 32, 1, checkpointing=checkpointing)["activations"]
                - estimate("llama-2-7b", layout, K, 8, 256, 32, 1, checkpointing=checkpointing)["activations"])

    assert extra_context("shared", 8) == extra_context("shared", 1) > 0
    assert extra_context("prefix", 8) == 8 * extra_context("prefix", 1)
    # Checkpointed, K=1's peak can be the context pass itself (one layer's temporaries over the
    # whole context), so a longer context costs K=8 no more than K=1.
    assert 0 < extra_context("shared", 8, True) <= extra_context("shared", 1, True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_bound_heap_retention_returns_freed_tensors_to_the_os():
    # A freed 16 MiB mapping raises glibc's mmap threshold past it; an 8 MiB tensor then comes from
    # the heap and stays resident after it is freed, unless the threshold was fixed first.
    code = """
import sys, torch
from spt_fast.utils import bound_heap_retention
from spt_fast.benchmarks.memory import _rss
x = torch.empty(16 << 20, dtype=torch.uint8); x.fill_(1); del x
if sys.argv[1] == "1":
    assert bound_heap_retention()
base = _rss()
y = torch.empty(8 << 20, dtype=torch.uint8); y.fill_(1); del y
print((_rss() - base) / 2 ** 20)
"""
    kept = {}
    for fixed in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code, fixed], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        kept[fixed] = float(out.stdout.strip().splitlines()[-1])
    assert kept["0"] > 6 and kept["1"] < 1, kept
