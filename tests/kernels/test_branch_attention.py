"""Triton branch attention vs its PyTorch reference (CPU: TRITON_INTERPRET=1, set in conftest)."""
import math

import pytest
import torch

from spt_fast.kernels import branch_attention as ba
from spt_fast.kernels.branch_attention import branch_attention, branch_attention_ref, branch_attention_triton

# (N branches, B samples, H, Hkv, Tb, Tc, D): odd lengths, GQA ratios 1/2/4, a one-token branch,
# a one-token context, several blocks in both the context and the causal part.
SHAPES = [
    (2, 1, 1, 1, 1, 1, 16),
    (4, 2, 4, 2, 5, 7, 16),
    (6, 3, 4, 1, 37, 70, 32),
    (4, 2, 2, 2, 67, 130, 64),
    (3, 2, 6, 3, 19, 1, 32),
]
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 1e-2, 0.0)]


def make_inputs(n, b, h, hkv, tb, tc, d, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = randn(n, h, tb, d), randn(n, hkv, tb, d), randn(n, hkv, tb, d)
    ctx_k, ctx_v = randn(b, hkv, tc, d), randn(b, hkv, tc, d)
    ctx_len = torch.randint(1, tc + 1, (b,), generator=gen)
    ctx_len[0] = 1  # the shortest legal context
    if b > 1:
        ctx_len[-1] = tc
    # Branches in a shuffled order: the kernel must follow sample_of, not assume a layout.
    sample_of = (torch.arange(n) % b)[torch.randperm(n, generator=gen)]
    grad_out = randn(n, h, tb, d)
    return q, k, v, ctx_k, ctx_v, ctx_len.to(device), sample_of.to(device), grad_out


def run(fn, q, k, v, ctx_k, ctx_v, ctx_len, sample_of, grad_out, scale=None):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def same_dtype_torch(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return ba._attention_math(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale, q.dtype)


def check(inputs, dtype, atol, rtol, scale=None):
    got = run(branch_attention_triton, *inputs, scale=scale)
    names = ["out", "dq", "dk", "dv"]
    if dtype == torch.float32:
        want = run(branch_attention_ref, *inputs, scale=scale)
        for name, g, w in zip(names, got, want):
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        return
    up = [t.float() if t.is_floating_point() else t for t in inputs]
    ref32 = run(branch_attention_ref, *up, scale=scale)
    same = run(same_dtype_torch, *inputs, scale=scale)
    for name, g, w, s in zip(names, got, ref32, same):
        assert g.dtype == dtype
        kernel_err = (g.float() - w).abs().max().item()
        torch_err = (s.float() - w).abs().max().item()
        assert kernel_err <= 2 * torch_err + atol, f"{name}: kernel err {kernel_err} vs torch {dtype} err {torch_err}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "bf16"])
def test_matches_reference(shape, dtype, atol, rtol):
    check(make_inputs(*shape, dtype), dtype, atol, rtol)


# The GPU tiles differ from the interpreter's; unequal query / key tiles exercise the loop bounds
# (causal cut-off, the dk/dv start row) that equal tiles would hide.
@pytest.mark.parametrize("blocks", [(16, 32, 16), (32, 16, 16), (16, 16, 32)], ids=str)
def test_unequal_tiles(monkeypatch, blocks):
    monkeypatch.setattr(ba, "_pick_blocks", lambda tb, d, eb, on_gpu: (*blocks, 4, 1))
    check(make_inputs(4, 2, 4, 2, 45, 37, 16, torch.float32, seed=1), torch.float32, 1e-4, 1e-4)


def test_custom_scale_and_strided_inputs():
    q, k, v, ctx_k, ctx_v, ctx_len, sample_of, grad_out = make_inputs(3, 2, 2, 1, 11, 9, 32, torch.float32, seed=2)
    # [N, T, H, D] storage viewed as [N, H, T, D], as a model's projections produce it.
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    ctx_k = ctx_k.transpose(1, 2).contiguous().transpose(1, 2)
    check((q, k, v, ctx_k, ctx_v, ctx_len, sample_of, grad_out), torch.float32, 1e-4, 1e-4, scale=0.3)


def test_padded_rows_stay_finite():
    q, k, v, ctx_k, ctx_v, ctx_len, sample_of, grad_out = make_inputs(4, 2, 2, 2, 13, 6, 16, torch.float32, seed=3)
    for t in (q, k, v):
        t[:, :, 4:] = 0.0  # right padding after 4 real tokens
    ctx_k[:, :, 1:] = float("nan")  # context beyond ctx_len must never be read
    ctx_v[:, :, 1:] = float("nan")
    ctx_len = torch.ones_like(ctx_len)
    out, dq, dk, dv = run(branch_attention_triton, q, k, v, ctx_k, ctx_v, ctx_len, sample_of, grad_out)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()


def test_reference_matches_explicit_loop():
    q, k, v, ctx_k, ctx_v, ctx_len, sample_of, _ = make_inputs(3, 2, 4, 2, 5, 6, 16, torch.float32, seed=4)
    out = branch_attention_ref(q, k, v, ctx_k, ctx_v, ctx_len, sample_of)
    group = q.shape[1] // k.shape[1]
    for n in range(q.shape[0]):
        s = int(sample_of[n])
        for h in range(q.shape[1]):
            kh = h // group
            for i in range(q.shape[2]):
                keys = torch.cat([ctx_k[s, kh, : ctx_len[s]], k[n, kh, : i + 1]])
                vals = torch.cat([ctx_v[s, kh, : ctx_len[s]], v[n, kh, : i + 1]])
                p = torch.softmax(keys @ q[n, h, i] / 4.0, dim=0)
                torch.testing.assert_close(out[n, h, i], p @ vals, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grouped", [False, True], ids=["gathered", "grouped"])
@pytest.mark.parametrize("shape", [(2, 1, 2, 1, 3, 4, 16), (6, 3, 4, 2, 7, 11, 32), (4, 2, 6, 3, 1, 5, 16)])
def test_cpu_path_matches_reference_with_grads(shape, grouped, monkeypatch):
    """CPU dispatch runs the masked-SDPA path (both forms); it must agree with the reference, grads included."""
    if grouped:  # the form large shapes take
        monkeypatch.setattr(ba, "GATHER_MAX_BYTES", 0)
    inputs = make_inputs(*shape, torch.float32, seed=3)
    got = run(ba.branch_attention, *inputs)
    want = run(branch_attention_ref, *inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_cpu_path_with_uneven_branch_counts(monkeypatch):
    """Samples with different numbers of branches take the gathering form at any size; same answer."""
    monkeypatch.setattr(ba, "GATHER_MAX_BYTES", 0)
    q, k, v, ctx_k, ctx_v, ctx_len, _, grad_out = make_inputs(5, 2, 4, 2, 6, 7, 16, torch.float32, seed=6)
    sample_of = torch.tensor([1, 0, 1, 1, 0])
    inputs = (q, k, v, ctx_k, ctx_v, ctx_len, sample_of, grad_out)
    for g, w in zip(run(ba.branch_attention, *inputs), run(branch_attention_ref, *inputs)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_no_grad_forward():
    inputs = make_inputs(2, 2, 2, 2, 9, 5, 16, torch.float32, seed=5)[:7]
    with torch.no_grad():
        out = branch_attention_triton(*inputs)
    torch.testing.assert_close(out, branch_attention_ref(*inputs), atol=1e-5, rtol=1e-5)


def test_rejects_bad_inputs():
    q, k, v, ctx_k, ctx_v, ctx_len, sample_of, _ = make_inputs(2, 1, 3, 2, 3, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        branch_attention(q, k, v, ctx_k, ctx_v, ctx_len, sample_of)
    q, k, v, ctx_k, ctx_v, ctx_len, sample_of, _ = make_inputs(2, 1, 2, 2, 3, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="must not require grad"):
        branch_attention_triton(q, k, v, ctx_k.requires_grad_(True), ctx_v, ctx_len, sample_of)
    with pytest.raises(ValueError, match="sample_of shape"):
        branch_attention(q, k, v, ctx_k.detach(), ctx_v, ctx_len, sample_of[:1])


# Realistic sizes (Llama-7B-like heads, K=4 prompts x B=2 samples); native kernels only.
GPU_SHAPES = [
    (8, 2, 32, 32, 41, 300, 128),
    (8, 2, 32, 8, 200, 777, 128),
    (12, 3, 9, 3, 137, 513, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 2e-4, 2e-4), (torch.bfloat16, 2e-2, 0.0)], ids=["fp32", "bf16"])
def test_gpu_matches_reference(shape, dtype, atol, rtol):
    check(make_inputs(*shape, dtype, device="cuda"), dtype, atol, rtol)


@pytest.mark.gpu
def test_gpu_dispatches_to_triton(monkeypatch):
    calls = []
    real = ba.branch_attention_triton
    monkeypatch.setattr(ba, "branch_attention_triton", lambda *a: calls.append(1) or real(*a))
    inputs = make_inputs(4, 2, 4, 2, 33, 50, 64, torch.bfloat16, device="cuda")[:7]
    ba.branch_attention(*inputs)
    assert calls
