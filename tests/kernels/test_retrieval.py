"""Triton retriever + context pooling vs their PyTorch references (CPU: TRITON_INTERPRET=1)."""
import pytest
import torch

from spt_fast.kernels import retrieval as rt
from spt_fast.kernels.retrieval import (pool_context, pool_context_ref, pool_context_triton, retrieval,
                                        retrieval_ref, retrieval_triton)

# (B, K, L, d, topk): one sample / one prompt, the paper's K=4 L=8, Llama's L=1, odd widths, a batch
# bigger than one 16-row tile (several row blocks), topk = K.
SHAPES = [
    (1, 1, 1, 16, 1),
    (3, 4, 8, 40, 2),
    (5, 3, 1, 37, 3),
    (2, 4, 2, 100, 4),
    (20, 3, 2, 33, 1),
]
DTYPES = [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-3, 0.0)]
NAMES = ["scores", "log_q", "d_ctx", "d_prompts", "d_weight", "d_bias"]

# The paper's softplus(cos, beta=10, threshold=1) (SPTConfig.score_beta / score_threshold).
PAPER = dict(beta=10.0, threshold=1.0)


def make_inputs(b, k, l, d, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    bound = d ** -0.5  # nn.Linear's init range
    ctx = torch.randn(b, d, generator=gen)
    prompts = torch.randn(k, l, d, generator=gen) * l ** 0.5  # keys of the same scale as the queries
    weight = (torch.rand(d, d, generator=gen) * 2 - 1) * bound
    # A small bias keeps cosines spread around 0, so both softplus branches (beta * cos vs
    # threshold) and both signs are exercised; a large one would push every cosine towards 1.
    bias = (torch.rand(d, generator=gen) * 2 - 1) * bound * 0.1
    g_scores, g_logq = torch.randn(b, k, generator=gen), torch.randn(b, k, generator=gen)
    leaves = [t.to(device=device, dtype=dtype) for t in (ctx, prompts, weight, bias)]
    return leaves, (g_scores.to(device), g_logq.to(device))


def run(fn, leaves, upstream, topk, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    scores, log_q, top = fn(*leaves, topk=topk, **{**PAPER, **kw})
    loss = (scores.float() * upstream[0]).sum() + (log_q.float() * upstream[1]).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [scores.detach(), log_q.detach(), *grads], top


def same_dtype_torch(ctx, prompts, weight, bias, topk, beta=10.0, threshold=1.0, tau=1.0):
    return rt._retrieval_math(ctx, prompts, weight, bias, beta, threshold, tau, topk, ctx.dtype)


def check_top(top, ref_scores, topk):
    assert top.dtype == torch.int64 and top.shape == (ref_scores.shape[0], topk)
    # Picked scores must be the top values (robust to rounding-level near-ties).
    want = torch.sort(ref_scores, dim=-1, descending=True).values[:, :topk]
    torch.testing.assert_close(ref_scores.gather(1, top), want, atol=1e-6, rtol=0)


def check(leaves, upstream, topk, dtype, atol, rtol, **kw):
    got, top = run(retrieval_triton, leaves, upstream, topk, **kw)
    if dtype == torch.float32:
        want, want_top = run(retrieval_ref, leaves, upstream, topk, **kw)
        for name, g, w in zip(NAMES, got, want):
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        check_top(top, want[0], topk)
        return
    ref32, _ = run(retrieval_ref, [t.float() for t in leaves], upstream, topk, **kw)
    same, _ = run(same_dtype_torch, leaves, upstream, topk, **kw)
    for name, g, w, s in zip(NAMES, got, ref32, same):
        kernel_err = (g.float() - w).abs().max().item()
        torch_err = (s.float() - w).abs().max().item()
        assert kernel_err <= 2 * torch_err + atol, f"{name}: kernel err {kernel_err} vs torch {dtype} err {torch_err}"
    check_top(top, ref32[0], topk)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "bf16"])
def test_matches_reference(shape, dtype, atol, rtol):
    *dims, topk = shape
    leaves, upstream = make_inputs(*dims, dtype)
    check(leaves, upstream, topk, dtype, atol, rtol)


def test_outputs_are_fp32_and_scores_in_range():
    leaves, _ = make_inputs(3, 4, 2, 24, torch.bfloat16)
    scores, log_q, top = retrieval_triton(*leaves, **PAPER, topk=2)
    assert scores.dtype == log_q.dtype == torch.float32
    assert bool((scores > 0).all()) and bool((scores <= 1).all())
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(3))


# Tiles of 16 in every direction: several row blocks in the projection (M = 23), two query blocks
# in the scores, several column chunks and the dW read-modify-write across row blocks.
def test_small_tiles(monkeypatch):
    small = {key: 16 for key in rt._pick_blocks(1, 1, 16, False)}
    small["warps"] = 4
    monkeypatch.setattr(rt, "_pick_blocks", lambda b, k, d, on_gpu: small)
    leaves, upstream = make_inputs(20, 3, 2, 40, torch.float32)
    check(leaves, upstream, 2, torch.float32, 1e-5, 1e-4)


@pytest.mark.parametrize("tau, beta, threshold", [(0.5, 10.0, 1.0), (2.0, 1.0, 20.0), (1.0, 30.0, 0.5)])
def test_hyperparameters(tau, beta, threshold):
    leaves, upstream = make_inputs(3, 4, 2, 24, torch.float32, seed=1)
    check(leaves, upstream, 3, torch.float32, 1e-5, 1e-4, tau=tau, beta=beta, threshold=threshold)


def test_ties_pick_lowest_index():
    # Small integers make every product and sum exact in fp32, so identical prompts give identical
    # scores whatever order a matmul adds in (the interpreter's numpy/OpenBLAS dot rounds a row
    # differently by its position in the tile on some CPUs: a real tie must stay a tie).
    leaves, _ = make_inputs(4, 5, 2, 24, torch.float32)
    gen = torch.Generator().manual_seed(3)
    leaves = [torch.randint(-3, 4, t.shape, generator=gen).float() for t in leaves]
    prompts = leaves[1].clone()
    prompts[3] = prompts[1]  # prompts 1 and 3 tie for every sample
    prompts[4] = prompts[0]
    leaves[1] = prompts
    _, _, top = retrieval_triton(*leaves, **PAPER, topk=5)
    _, _, want = retrieval_ref(*leaves, **PAPER, topk=5)
    assert torch.equal(top, want)
    for row in top.tolist():
        assert row.index(1) < row.index(3) and row.index(0) < row.index(4)


def test_partial_grads_scores_only_no_bias():
    """Only scores feed the loss (log_q unused), ctx_feat frozen, no bias."""
    (ctx, prompts, weight, _), (g, _) = make_inputs(3, 4, 2, 24, torch.float32, seed=2)
    grads = []
    for fn in (retrieval_triton, retrieval_ref):
        p, w = prompts.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        scores, _, _ = fn(ctx, p, w, None, **PAPER)
        grads.append(torch.autograd.grad((scores * g).sum(), (p, w)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_log_q_only_and_strided_inputs():
    """Only log_q feeds the loss; prompts and W arrive as non-contiguous views."""
    (ctx, prompts, weight, bias), (_, g) = make_inputs(3, 4, 3, 24, torch.float32, seed=3)

    def leaves(strided):
        p = prompts.transpose(0, 1).contiguous().transpose(0, 1) if strided else prompts.clone()
        w = weight.t().contiguous().t() if strided else weight.clone()  # same values, column-major
        return [t.requires_grad_(True) for t in (ctx.clone(), p, w, bias.clone())]

    grads = []
    for fn, strided in ((retrieval_triton, True), (retrieval_ref, False)):
        inputs = leaves(strided)
        assert inputs[2].is_contiguous() != strided
        _, log_q, _ = fn(*inputs, **PAPER)
        grads.append(torch.autograd.grad((log_q * g).sum(), inputs))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_no_grad_and_public_dispatch():
    leaves, _ = make_inputs(3, 4, 2, 24, torch.float32)
    with torch.no_grad():
        got = retrieval_triton(*leaves, **PAPER, topk=2)
    want = retrieval(*leaves, **PAPER, topk=2)  # CPU tensors: the public op is the reference
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    assert torch.equal(got[2], want[2])


@pytest.mark.parametrize("bad, match", [
    (dict(topk=5), "topk"),
    (dict(tau=0.0), "tau"),
])
def test_bad_arguments(bad, match):
    leaves, _ = make_inputs(2, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        retrieval_triton(*leaves, **PAPER, **bad)
    with pytest.raises(ValueError, match=match):
        retrieval_ref(*leaves, **PAPER, **bad)


def test_bad_shapes():
    (ctx, prompts, weight, bias), _ = make_inputs(2, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        retrieval(ctx, prompts, weight[:, :8], bias, **PAPER)
    with pytest.raises(ValueError, match="prompts"):
        retrieval(ctx, prompts[:, :, :8], weight, bias, **PAPER)


# ---- pool_context ------------------------------------------------------------------------------
@pytest.mark.parametrize("b, t, d, start", [(3, 9, 16, 0), (4, 17, 40, 1), (1, 1, 8, 0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pool_context(b, t, d, start, dtype):
    gen = torch.Generator().manual_seed(b * t)
    embeds = torch.randn(b, t, d, generator=gen).to(dtype)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[0] = t
    if b > 1:
        lengths[1] = start  # an empty range gives zeros, not NaN
    got = pool_context_triton(embeds, lengths, start)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, pool_context_ref(embeds, lengths, start), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool_context(embeds, lengths, start), pool_context_ref(embeds, lengths, start))


# ---- native GPU, realistic widths ----------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 4, 8, 768, 1), (8, 4, 1, 4096, 2), (64, 4, 8, 2560, 4)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "bf16"])
def test_gpu_matches_reference(shape, dtype, atol, rtol):
    *dims, topk = shape
    leaves, upstream = make_inputs(*dims, dtype, device="cuda")
    check(leaves, upstream, topk, dtype, atol, rtol)


@pytest.mark.gpu
def test_gpu_pool_context():
    embeds = torch.randn(8, 300, 4096, device="cuda", dtype=torch.bfloat16)
    lengths = torch.randint(1, 301, (8,), device="cuda")
    torch.testing.assert_close(pool_context(embeds, lengths, 1), pool_context_ref(embeds, lengths, 1),
                               atol=1e-4, rtol=1e-4)
