"""Triton fused linear + CE and its chunked PyTorch (CPU) path vs the reference (CPU: TRITON_INTERPRET=1,
set in conftest)."""
import pytest
import torch

from spt_fast.kernels import fused_ce as fce
from spt_fast.kernels import fused_ce_chunked
from spt_fast.kernels.fused_ce import (
    fused_linear_ce, fused_linear_ce_chunked, fused_linear_ce_losses, fused_linear_ce_ref, fused_linear_ce_triton,
)


@pytest.fixture(params=["triton", "chunked"])
def impl(request, monkeypatch):
    """Both fast paths; the chunked one with chunks of 256 columns, so every shape spans several."""
    if request.param == "chunked":
        monkeypatch.setattr(fused_ce_chunked, "_CHUNK_ELEMS", 1)
        return fused_linear_ce_chunked
    return fused_linear_ce_triton

# (K, B, T, d, V): a single token, odd d (masked d tail), V not a multiple of the vocab tile,
# several vocab tiles (split merge), more rows than one row block.
SHAPES = [
    (1, 1, 1, 32, 100),
    (3, 2, 7, 48, 300),
    (4, 3, 5, 33, 257),
    (2, 4, 9, 64, 131),
]
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 2e-2, 0.0)]


def make_inputs(K, B, T, d, V, dtype, bias=False, scores=True, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(K, B, T, d, generator=gen)
    # Logit std ~2-3, as from a trained head, so the softmax is neither flat nor one-hot.
    weight = torch.randn(V, d, generator=gen) * (2.5 / d ** 0.5)
    b = torch.randn(V, generator=gen) if bias else None
    targets = torch.randint(0, V, (B, T), generator=gen)
    # Right padding of varied lengths; with B > 2 one sample has no targets at all.
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T
    if B > 2:
        lengths[1] = 0
    targets[torch.arange(T)[None, :] >= lengths[:, None]] = -100
    s = (torch.rand(B, K, generator=gen) * 0.9 + 0.1) if scores else None
    grad_seq = torch.randn(K, B, generator=gen)
    grad_fus = torch.tensor(0.7)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return (cast(hidden), cast(weight), cast(b), targets.to(device), None if s is None else s.to(device),
            grad_seq.to(device), grad_fus.to(device))


def run(fn, hidden, weight, bias, targets, scores, grad_seq, grad_fus):
    hidden = hidden.detach().clone().requires_grad_(True)
    scores = None if scores is None else scores.detach().clone().requires_grad_(True)
    seq, fus = fn(hidden, weight, bias, targets, scores)
    loss = (seq * grad_seq).sum()
    if fus is not None:
        loss = loss + fus * grad_fus
    loss.backward()
    return [seq.detach(), None if fus is None else fus.detach(), hidden.grad,
            None if scores is None else scores.grad]


def same_dtype_torch(hidden, weight, bias, targets, scores=None):
    return fce._ce_math(hidden, weight, bias, targets, scores, hidden.dtype)


def check(inputs, dtype, atol, rtol, fn=fused_linear_ce_triton):
    got = run(fn, *inputs)
    want = run(fused_linear_ce_ref, *inputs)
    names = ["seq_ce_sum", "fusion", "d_hidden", "d_scores"]
    for name, g, w in zip(names, got, want):
        assert (g is None) == (w is None), name
        if g is None:
            continue
        assert torch.isfinite(g).all(), name
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    if dtype == torch.float32:
        return
    # bf16: the kernel may be off the fp32 reference by at most twice what plain bf16 PyTorch is,
    # plus atol scaled to the output's size (a CE sum over T tokens is larger than one CE; with a
    # single element the PyTorch error alone is too noisy a yardstick).
    plain = run(same_dtype_torch, *inputs)
    for name, g, w, p in zip(names, got, want, plain):
        if g is None:
            continue
        err = (g.float() - w.float()).abs()
        bound = 2 * (p.float() - w.float()).abs() + atol * max(1.0, w.abs().max().item())
        assert (err <= bound).all(), f"{name}: max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(shape, dtype, atol, rtol, bias, impl):
    check(make_inputs(*shape, dtype, bias=bias), dtype, atol, rtol, impl)


@pytest.mark.parametrize("bias", [False, True])
def test_without_scores(bias, impl):
    inputs = make_inputs(3, 2, 7, 48, 300, torch.float32, bias=bias, scores=False)
    check(inputs, torch.float32, 1e-4, 1e-4, impl)


def test_seq_grad_only(impl):
    # L_LM alone: fusion output unused, so its grad arrives as None/zeros.
    hidden, weight, bias, targets, scores, grad_seq, _ = make_inputs(2, 3, 6, 32, 150, torch.float32, bias=True)
    results = []
    for fn in (impl, fused_linear_ce_ref):
        h = hidden.clone().requires_grad_(True)
        s = scores.clone().requires_grad_(True)
        seq, _ = fn(h, weight, bias, targets, s)
        seq.sum().backward()
        results.append((h.grad, s.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert results[0][1] is None or torch.all(results[0][1] == 0)


def test_chunked_backward(monkeypatch):
    # A tiny G budget forces many row chunks in backward; results must not change.
    monkeypatch.setattr(fce, "_GRAD_CHUNK_ELEMS", 1)
    check(make_inputs(3, 2, 9, 32, 200, torch.float32, bias=True), torch.float32, 1e-4, 1e-4)


def test_all_padding_gives_zeros():
    hidden, weight, bias, targets, scores, _, _ = make_inputs(2, 2, 4, 32, 100, torch.float32, bias=True)
    targets = torch.full_like(targets, -100)
    for fn in (fused_linear_ce_triton, fused_linear_ce_chunked, fused_linear_ce_ref):
        h = hidden.clone().requires_grad_(True)
        s = scores.clone().requires_grad_(True)
        seq, fus = fn(h, weight, bias, targets, s)
        (seq.sum() + fus).backward()
        assert torch.all(seq == 0) and fus.item() == 0
        assert torch.all(h.grad == 0) and torch.all(s.grad == 0)


def test_non_contiguous_hidden():
    hidden, weight, bias, targets, scores, grad_seq, grad_fus = make_inputs(3, 2, 7, 48, 300, torch.float32)
    # The SPT model gathers hidden rows; a transposed view must give the same answer.
    strided = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    got = run(fused_linear_ce_triton, strided, weight, bias, targets, scores, grad_seq, grad_fus)
    want = run(fused_linear_ce_ref, hidden, weight, bias, targets, scores, grad_seq, grad_fus)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_one_hot_scores_pick_one_prompt():
    # With s_b = e_k the fused logits are prompt k's logits: fusion = mean_b seq_ce_mean[k, b].
    K, B = 3, 2
    hidden, weight, bias, targets, _, _, _ = make_inputs(K, B, 6, 32, 120, torch.float32, bias=True)
    scores = torch.zeros(B, K)
    scores[0, 2] = scores[1, 0] = 1.0
    seq, fus = fused_linear_ce_triton(hidden, weight, bias, targets, scores)
    n = (targets != -100).sum(-1).float()
    expected = (seq[2, 0] / n[0] + seq[0, 1] / n[1]) / 2
    torch.testing.assert_close(fus, expected, atol=1e-5, rtol=1e-5)


def test_saves_no_vocab_sized_tensors():
    # Memory contract: apart from the head itself, backward keeps only row-sized tensors.
    K, B, T, d, V = 3, 2, 7, 48, 300
    hidden, weight, bias, targets, scores, _, _ = make_inputs(K, B, T, d, V, torch.float32, bias=True)
    hidden.requires_grad_(True)
    scores.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_linear_ce_triton(hidden, weight, bias, targets, scores)
    others = [t for t in saved if t.data_ptr() not in (weight.data_ptr(), bias.data_ptr())]
    n_pos = int((targets != -100).sum())
    assert sum(t.numel() for t in others) <= (K + 1) * n_pos * (d + 8) + B * K + B
    assert all(V not in t.shape for t in others)


def test_losses_dict():
    hidden, weight, bias, targets, scores, _, _ = make_inputs(3, 3, 5, 32, 100, torch.float32)
    out = fused_linear_ce_losses(hidden, weight, bias, targets, scores)
    seq, fus = fused_linear_ce_ref(hidden, weight, bias, targets, scores)
    n = (targets != -100).sum(-1)
    torch.testing.assert_close(out["seq_ce_sum"], seq)
    assert torch.equal(out["n_tokens"], n)
    torch.testing.assert_close(out["seq_ce_mean"], seq / n.clamp_min(1)[None, :])
    torch.testing.assert_close(out["token_mean"], seq.sum() / (3 * n.sum()))
    torch.testing.assert_close(out["fusion"], fus)
    assert fused_linear_ce_losses(hidden, weight, bias, targets)["fusion"] is None


def test_dispatch_on_cpu(monkeypatch):
    # Small fp32 logits: the materialised reference, bit for bit.
    inputs = make_inputs(2, 2, 5, 32, 100, torch.float32)[:5]
    seq, fus = fused_linear_ce(*inputs)
    seq_ref, fus_ref = fused_linear_ce_ref(*inputs)
    assert torch.equal(seq, seq_ref) and torch.equal(fus, fus_ref)
    called = []
    real = fce.fused_linear_ce_chunked
    monkeypatch.setattr(fce, "fused_linear_ce_chunked", lambda *a: called.append(1) or real(*a))
    # A bf16 head (the reference would copy it whole to fp32), or logits past the budget: chunked.
    fused_linear_ce(*make_inputs(2, 2, 5, 32, 100, torch.bfloat16)[:5])
    assert called == [1]
    monkeypatch.setattr(fce, "MATERIALISE_MAX_BYTES", (2 + 1) * 10 * 100 * 4 - 1)
    seq, fus = fused_linear_ce(*inputs)
    assert called == [1, 1]
    torch.testing.assert_close(seq, seq_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fus, fus_ref, atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_named():
    hidden, weight, bias, targets, scores, _, _ = make_inputs(2, 3, 5, 32, 100, torch.float32)
    with pytest.raises(ValueError, match="targets shape"):
        fused_linear_ce_triton(hidden, weight, bias, targets[:, :3], scores)
    with pytest.raises(ValueError, match="scores shape"):
        fused_linear_ce_triton(hidden, weight, bias, targets, scores.t())
    with pytest.raises(ValueError, match="frozen"):
        fused_linear_ce_triton(hidden, weight.clone().requires_grad_(True), bias, targets, scores)
    bad = targets.clone()
    bad[0, 0] = 100
    with pytest.raises(ValueError, match="target ids"):
        fused_linear_ce_triton(hidden, weight, bias, bad, scores)


# ---- GPU: native Triton on realistic sizes (OPT-125m-like head, SPT batch) ---------------------

GPU_SHAPES = [(4, 2, 33, 768, 50272), (4, 8, 64, 2048, 32000), (1, 3, 17, 4096, 32000)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 2e-3, 1e-4), (torch.bfloat16, 5e-2, 0.0)])
@pytest.mark.parametrize("bias", [False, True])
def test_gpu_matches_reference(shape, dtype, atol, rtol, bias):
    check(make_inputs(*shape, dtype, bias=bias, device="cuda"), dtype, atol, rtol)


@pytest.mark.gpu
def test_gpu_dispatch_is_triton():
    inputs = make_inputs(2, 2, 9, 64, 1000, torch.bfloat16, device="cuda")[:5]
    hidden = inputs[0].requires_grad_(True)
    seq, _ = fused_linear_ce(hidden, *inputs[1:])
    assert "FusedLinearCE" in type(seq.grad_fn).__name__
