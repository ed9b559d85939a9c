"""Fused SPT retriever: pooled context features -> shared projection -> cosine -> softplus
-> log-softmax -> top-k, for B x K scores (DESIGN §1 "Retriever", §3 kernels).

Layout of the Triton path (all math in fp32 whatever the input dtype):
- forward, two kernels:
  _project_kernel: Y = A W^T + b for the M = B + K rows A = [x̄_1..x̄_B ; p̄_1..p̄_K]. The prompt
    means p̄_k are formed while loading A, so the op takes raw prompts. The op is bound by reading
    W (d x d) once; all M rows share each W tile. The column-block-0 programs also store A, which
    the backward needs for dW.
  _score_kernel: per block of query rows, the B x K dot products and the norms over d, then cosine,
    softplus, log-softmax and an iterative top-k, all in registers (K is small).
- backward, two kernels (a real Triton backward, nothing is recomputed in PyTorch):
  _score_bwd_kernel: from dL/dscores and dL/dlog_q back to dL/dY for all M rows, plus dbias.
  _project_bwd_kernel: each program owns a strip of W's input columns, so it reads W once and
    writes dW once (no atomics, deterministic) while accumulating dA = dY W; dA splits into
    d x̄ (the context rows) and d prompts = d p̄ / L broadcast over the L rows.
pool_context is a separate small kernel: the caller pools the frozen embeddings (no grad).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .runtime import device_guard, native_gpu, pow2, use_triton

COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default
# The reference runs fp32 matmuls; TF32 would move the scores by ~1e-3 and can flip the arg-max.
# W is read once either way, so full-precision dots cost little on this memory-bound op.
_DOT_PRECISION = "ieee"


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
def pool_context_ref(embeds, lengths, start: int = 0):
    """Mean of embeds[b, start:lengths[b]] in fp32: x̄_b (an empty range gives zeros)."""
    T = embeds.shape[1]
    pos = torch.arange(T, device=embeds.device)
    mask = (pos[None, :] >= start) & (pos[None, :] < lengths[:, None].to(embeds.device))
    total = (embeds.float() * mask[:, :, None]).sum(1)
    return total / mask.sum(1, keepdim=True).clamp_min(1)


def _retrieval_math(ctx_feat, prompts, weight, bias, beta, threshold, tau, topk, compute_dtype):
    """The obviously-correct version in `compute_dtype` (tests also run it in bf16)."""
    w = weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    keys = F.linear(prompts.to(compute_dtype).mean(1), w, b)  # [K, d]
    query = F.linear(ctx_feat.to(compute_dtype), w, b)  # [B, d]
    cos = F.cosine_similarity(query[:, None, :], keys[None, :, :], dim=-1, eps=COS_EPS)
    scores = F.softplus(cos, beta=beta, threshold=threshold)
    log_q = F.log_softmax(scores / tau, dim=-1)
    # A stable descending sort puts the lowest index first among ties; torch.topk promises no order.
    top = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[:, :topk]
    return scores, log_q, top


def retrieval_ref(ctx_feat, prompts, weight, bias, *, beta: float, threshold: float, tau: float = 1.0,
                  topk: int = 1):
    """scores [B, K] = softplus(cos(W p̄_k + b, W x̄_b + b)), log_q = log_softmax(scores / tau),
    top_idx [B, topk] (ties -> lowest index). Computed in fp32; scores and log_q are fp32."""
    _check_inputs(ctx_feat, prompts, weight, bias, tau, topk)
    return _retrieval_math(ctx_feat, prompts, weight, bias, beta, threshold, tau, topk, torch.float32)


def _check_inputs(ctx_feat, prompts, weight, bias, tau, topk):
    if ctx_feat.dim() != 2:
        raise ValueError(f"retrieval: ctx_feat must be [B, d], got shape {tuple(ctx_feat.shape)}")
    if prompts.dim() != 3:
        raise ValueError(f"retrieval: prompts must be [K, L, d], got shape {tuple(prompts.shape)}")
    d = ctx_feat.shape[1]
    K, L = prompts.shape[0], prompts.shape[1]
    if prompts.shape[2] != d or K < 1 or L < 1:
        raise ValueError(f"retrieval: prompts shape {tuple(prompts.shape)} must be [K>=1, L>=1, {d}]")
    if weight.shape != (d, d):
        raise ValueError(f"retrieval: weight shape {tuple(weight.shape)} must be [{d}, {d}]")
    if bias is not None and bias.shape != (d,):
        raise ValueError(f"retrieval: bias shape {tuple(bias.shape)} must be [{d}]")
    if not 0 <= topk <= K:
        raise ValueError(f"retrieval: topk={topk} must be between 0 and the number of prompts {K}")
    if not tau > 0:
        raise ValueError(f"retrieval: tau={tau} must be > 0")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _pool_kernel(E, LEN, OUT, T, D, start, s_eb, s_et, s_ed,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    hi = tl.minimum(tl.load(LEN + b).to(tl.int32), T)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(start, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ptr = E + b * s_eb + t[:, None] * s_et + dd[None, :] * s_ed
        tile = tl.load(ptr, mask=(t < hi)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(tile, 0)
    count = tl.maximum(hi - start, 1).to(tl.float32)
    tl.store(OUT + b * D + dd, acc / count, mask=dmask)


@triton.jit
def _project_kernel(CTX, PROMPTS, W, BIAS, Y, A,
                    B, K, L, D,
                    s_cb, s_cd, s_pk, s_pl, s_pd, s_wn, s_wd,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    is_ctx = rows < B
    is_key = (rows >= B) & (rows < B + K)
    key = rows - B  # negative on context rows, which are masked out of the prompt loads
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        a = tl.load(CTX + rows[:, None] * s_cb + dd[None, :] * s_cd,
                    mask=is_ctx[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        psum = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for l in range(L):
            psum += tl.load(PROMPTS + key[:, None] * s_pk + l * s_pl + dd[None, :] * s_pd,
                            mask=is_key[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        a += psum / L
        # One column block is enough to keep A for the backward; every block computes the same A.
        tl.store(A + rows[:, None] * D + dd[None, :], a,
                 mask=((rows < B + K) & (rows * 0 + pid_n == 0))[:, None] & dmask[None, :])
        w = tl.load(W + cols[None, :] * s_wn + dd[:, None] * s_wd,
                    mask=cmask[None, :] & dmask[:, None], other=0.0).to(tl.float32)  # W^T tile [D, N]
        acc += tl.dot(a, w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * D + cols[None, :], acc, mask=(rows < B + K)[:, None] & cmask[None, :])


@triton.jit
def _score_kernel(Y, SCORES, LOGQ, TOP, COS, NORMS,
                  B, K, D, beta, threshold, inv_tau, eps,
                  TOPK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    k = tl.arange(0, BLOCK_K)
    bmask = b < B
    kmask = k < K
    cross = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    nq2 = tl.zeros([BLOCK_B], dtype=tl.float32)
    nk2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        yq = tl.load(Y + b[:, None] * D + dd[None, :], mask=bmask[:, None] & dmask[None, :], other=0.0)
        yk = tl.load(Y + (B + k)[:, None] * D + dd[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        cross += tl.dot(yq, tl.trans(yk), input_precision=PRECISION)
        nq2 += tl.sum(yq * yq, 1)
        nk2 += tl.sum(yk * yk, 1)
    nq_raw = tl.sqrt(nq2)
    nk_raw = tl.sqrt(nk2)
    # cosine_similarity clamps each norm separately: x·y / (max(|x|, eps) * max(|y|, eps)).
    c = cross / (tl.maximum(nq_raw, eps)[:, None] * tl.maximum(nk_raw, eps)[None, :])

    # softplus with torch semantics; log1p(e) via log(u) * e / (u - 1) keeps full precision when
    # e = exp(beta * c) is tiny (1 + e would round the small part away).
    bc = beta * c
    e = tl.exp(tl.minimum(bc, threshold))
    u = 1.0 + e
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))
    s = tl.where(bc > threshold, c, log1p_e / beta)

    valid = kmask[None, :]
    z = tl.where(valid, s * inv_tau, float("-inf"))
    zmax = tl.max(z, 1)
    lse = zmax + tl.log(tl.sum(tl.exp(z - zmax[:, None]), 1))
    log_q = z - lse[:, None]

    m2 = bmask[:, None] & kmask[None, :]
    out_off = b[:, None] * K + k[None, :]
    tl.store(SCORES + out_off, s, mask=m2)
    tl.store(LOGQ + out_off, log_q, mask=m2)
    tl.store(COS + out_off, c, mask=m2)
    tl.store(NORMS + b, nq_raw, mask=bmask)
    tl.store(NORMS + B + k, nk_raw, mask=kmask & (k * 0 + pid == 0))

    # top-k by repeated arg-max; the lowest index wins a tie, matching the reference's stable sort.
    cur = tl.where(valid, s, float("-inf"))
    for i in tl.static_range(TOPK):
        best = tl.max(cur, 1)
        idx = tl.min(tl.where(cur == best[:, None], k[None, :], BLOCK_K), 1)
        tl.store(TOP + b * TOPK + i, idx.to(tl.int64), mask=bmask)
        cur = tl.where(k[None, :] == idx[:, None], float("-inf"), cur)


@triton.jit
def _score_bwd_kernel(Y, NORMS, COS, LOGQ, GS, GL, GY, GBIAS,
                      B, K, D, beta, threshold, inv_tau, eps,
                      HAS_GS: tl.constexpr, HAS_GL: tl.constexpr, NEED_GBIAS: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                      PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < D
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    nk_raw = tl.load(NORMS + B + k, mask=kmask, other=1.0)
    nk = tl.maximum(nk_raw, eps)
    # torch differentiates the unclamped norm (its clamp runs under no_grad): d|y|/dy = y / |y|.
    rk = tl.where(nk_raw > 0, 1.0 / nk_raw, 0.0)
    yk = tl.load(Y + (B + k)[:, None] * D + n[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
    kn = yk / nk[:, None]
    acc_gk = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    colsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    gbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        bmask = b < B
        m2 = bmask[:, None] & kmask[None, :]
        off = b[:, None] * K + k[None, :]
        c = tl.load(COS + off, mask=m2, other=0.0)
        g = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
        if HAS_GL:
            gl = tl.load(GL + off, mask=m2, other=0.0).to(tl.float32)
            p = tl.exp(tl.load(LOGQ + off, mask=m2, other=float("-inf")))
            g += (gl - p * tl.sum(gl, 1)[:, None]) * inv_tau
        if HAS_GS:
            g += tl.load(GS + off, mask=m2, other=0.0).to(tl.float32)
        bc = beta * c
        gc = tl.where(m2, g * tl.where(bc > threshold, 1.0, tl.sigmoid(bc)), 0.0)
        nq_raw = tl.load(NORMS + b, mask=bmask, other=1.0)
        nq = tl.maximum(nq_raw, eps)
        rq = tl.where(nq_raw > 0, 1.0 / nq_raw, 0.0)
        yq = tl.load(Y + b[:, None] * D + n[None, :], mask=bmask[:, None] & nmask[None, :], other=0.0)
        gcc = gc * c
        # d cos / d q = k̂ / n_q - cos * q / (|q| n_q), summed over k with weights gc.
        gq = (tl.dot(gc, kn, input_precision=PRECISION) / nq[:, None]
              - (tl.sum(gcc, 1) * rq / nq)[:, None] * yq)
        tl.store(GY + b[:, None] * D + n[None, :], gq, mask=bmask[:, None] & nmask[None, :])
        gbias += tl.sum(gq, 0)
        acc_gk += tl.dot(tl.trans(gc), yq / nq[:, None], input_precision=PRECISION)
        colsum += tl.sum(gcc, 0)
    gk = acc_gk / nk[:, None] - (colsum * rk / nk)[:, None] * yk
    tl.store(GY + (B + k)[:, None] * D + n[None, :], gk, mask=kmask[:, None] & nmask[None, :])
    if NEED_GBIAS:
        tl.store(GBIAS + n, gbias + tl.sum(gk, 0), mask=nmask)


@triton.jit
def _project_bwd_kernel(GY, A, W, GW, GCTX, GPROMPTS,
                        B, K, L, D,
                        s_wn, s_wd, s_gcb, s_gcd, s_gpk, s_gpl, s_gpd,
                        NEED_GW: tl.constexpr, NEED_GCTX: tl.constexpr, NEED_GPROMPTS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    dd = pid * BLOCK_D + tl.arange(0, BLOCK_D)  # this program's strip of W's input columns
    dmask = dd < D
    M = B + K
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        a = tl.load(A + rows[:, None] * D + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        ga = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, D, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < D
            gy = tl.load(GY + rows[:, None] * D + n[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
            if NEED_GCTX or NEED_GPROMPTS:
                w = tl.load(W + n[:, None] * s_wn + dd[None, :] * s_wd,
                            mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                ga += tl.dot(gy, w, input_precision=PRECISION)
            if NEED_GW:
                wmask = nmask[:, None] & dmask[None, :]
                gw_ptr = GW + n[:, None] * D + dd[None, :]
                gw = tl.dot(tl.trans(gy), a, input_precision=PRECISION)
                # Row blocks after the first add to what this same program stored: no race.
                gw += tl.load(gw_ptr, mask=wmask & (dd * 0 + m0 > 0)[None, :], other=0.0)
                tl.store(gw_ptr, gw, mask=wmask)
        if NEED_GCTX:
            tl.store(GCTX + rows[:, None] * s_gcb + dd[None, :] * s_gcd, ga,
                     mask=(rows < B)[:, None] & dmask[None, :])
        if NEED_GPROMPTS:
            gp = ga / L  # p̄ is the mean of L rows: each row gets 1/L of the key's gradient
            pmask = ((rows >= B) & rmask)[:, None] & dmask[None, :]
            for l in range(L):
                tl.store(GPROMPTS + (rows - B)[:, None] * s_gpk + l * s_gpl + dd[None, :] * s_gpd, gp, mask=pmask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _pick_blocks(B: int, K: int, d: int, on_gpu: bool) -> dict:
    """Tile sizes by heuristic (no autotune in the interpreter); tl.dot wants every dim >= 16.

    GPU: 32-wide column tiles so that even d = 4096 spreads W over ~128 programs (the op is bound
    by reading W and writing dW). Interpreter: wide tiles, each program instance costs ~0.5 ms.
    All K prompts sit in one tile (softmax and top-k run across it in registers)."""
    M = B + K
    cols = 32 if on_gpu else 128
    chunk = 64 if on_gpu else 128
    return {
        # _project_kernel: rows of A x output columns, looping over the input width in chunks
        "proj_m": pow2(M, 16, 64), "proj_n": pow2(d, 16, cols), "proj_d": pow2(d, 16, chunk),
        # _score_kernel: query rows x all K keys, looping over d in chunks
        "score_b": pow2(B, 16, 32 if K <= 64 else 16), "score_k": pow2(K, 16, 1 << 20),
        "score_d": pow2(d, 16, chunk),
        # _score_bwd_kernel: output columns per program
        "bwd_n": pow2(d, 16, chunk),
        # _project_bwd_kernel: a strip of W's input columns per program, rows of dY, output chunk
        "bwd_strip": pow2(d, 16, cols), "bwd_m": pow2(M, 16, 32), "bwd_strip_n": pow2(d, 16, cols),
        "warps": 4,
    }


def pool_context_triton(embeds, lengths, start: int = 0):
    if embeds.dim() != 3:
        raise ValueError(f"pool_context: embeds must be [B, T, d], got shape {tuple(embeds.shape)}")
    B, T, d = embeds.shape
    if lengths.shape != (B,):
        raise ValueError(f"pool_context: lengths shape {tuple(lengths.shape)} must be [{B}]")
    out = torch.empty(B, d, device=embeds.device, dtype=torch.float32)
    if B == 0 or d == 0:
        return out
    lengths = lengths.to(embeds.device).contiguous()
    on_gpu = native_gpu(embeds)
    block_d = pow2(d, 16, 256 if on_gpu else 1024)
    block_t = pow2(T, 1, max(1, 4096 // block_d) if on_gpu else 64)
    with device_guard(embeds):
        _pool_kernel[(B, triton.cdiv(d, block_d))](
            embeds, lengths, out, T, d, int(start), *embeds.stride(), BLOCK_T=block_t, BLOCK_D=block_d,
        )
    return out


def _forward(ctx_feat, prompts, weight, bias, beta, threshold, tau, topk):
    B, d = ctx_feat.shape
    K, L = prompts.shape[0], prompts.shape[1]
    M = B + K
    dev = ctx_feat.device
    on_gpu = native_gpu(ctx_feat)
    blk = _pick_blocks(B, K, d, on_gpu)
    f32 = dict(device=dev, dtype=torch.float32)
    y, a = torch.empty(M, d, **f32), torch.empty(M, d, **f32)
    scores, log_q, cos = torch.empty(B, K, **f32), torch.empty(B, K, **f32), torch.empty(B, K, **f32)
    norms = torch.empty(M, **f32)
    top = torch.empty(B, topk, device=dev, dtype=torch.int64)
    with device_guard(ctx_feat):
        _project_kernel[(triton.cdiv(M, blk["proj_m"]), triton.cdiv(d, blk["proj_n"]))](
            ctx_feat, prompts, weight, bias if bias is not None else weight, y, a,
            B, K, L, d, *ctx_feat.stride(), *prompts.stride(), *weight.stride(),
            HAS_BIAS=bias is not None, BLOCK_M=blk["proj_m"], BLOCK_N=blk["proj_n"], BLOCK_D=blk["proj_d"],
            PRECISION=_DOT_PRECISION, num_warps=blk["warps"],
        )
        if B > 0:
            _score_kernel[(triton.cdiv(B, blk["score_b"]),)](
                y, scores, log_q, top, cos, norms, B, K, d, float(beta), float(threshold), 1.0 / tau, COS_EPS,
                TOPK=topk, BLOCK_B=blk["score_b"], BLOCK_K=blk["score_k"], BLOCK_D=blk["score_d"],
                PRECISION=_DOT_PRECISION, num_warps=blk["warps"],
            )
    return scores, log_q, top, (y, a, norms, cos)


def _backward(g_scores, g_logq, saved, ctx_feat, prompts, weight, bias, beta, threshold, tau, needs):
    y, a, norms, cos, log_q = saved
    B, d = ctx_feat.shape
    K, L = prompts.shape[0], prompts.shape[1]
    M = B + K
    need_ctx, need_prompts, need_w, need_b = needs
    on_gpu = native_gpu(ctx_feat)
    blk = _pick_blocks(B, K, d, on_gpu)
    dev = ctx_feat.device
    gy = torch.empty(M, d, device=dev, dtype=torch.float32)
    gbias = torch.empty(d, device=dev, dtype=torch.float32) if need_b else None
    gs = None if g_scores is None else g_scores.contiguous()
    gl = None if g_logq is None else g_logq.contiguous()
    # dW accumulates in fp32 across row blocks; a bf16 weight gets one cast at the end.
    gw = torch.empty(d, d, device=dev, dtype=torch.float32) if need_w else None
    gctx = torch.empty(B, d, device=dev, dtype=ctx_feat.dtype) if need_ctx else None
    gprompts = torch.empty(K, L, d, device=dev, dtype=prompts.dtype) if need_prompts else None
    dummy = y
    with device_guard(ctx_feat):
        _score_bwd_kernel[(triton.cdiv(d, blk["bwd_n"]),)](
            y, norms, cos, log_q, gs if gs is not None else dummy, gl if gl is not None else dummy, gy,
            gbias if gbias is not None else dummy,
            B, K, d, float(beta), float(threshold), 1.0 / tau, COS_EPS,
            HAS_GS=gs is not None, HAS_GL=gl is not None, NEED_GBIAS=need_b,
            BLOCK_B=blk["score_b"], BLOCK_K=blk["score_k"], BLOCK_N=blk["bwd_n"],
            PRECISION=_DOT_PRECISION, num_warps=blk["warps"],
        )
        if need_ctx or need_prompts or need_w:
            gctx_strides = gctx.stride() if gctx is not None else (0, 0)
            gp_strides = gprompts.stride() if gprompts is not None else (0, 0, 0)
            _project_bwd_kernel[(triton.cdiv(d, blk["bwd_strip"]),)](
                gy, a, weight, gw if gw is not None else dummy, gctx if gctx is not None else dummy,
                gprompts if gprompts is not None else dummy,
                B, K, L, d, *weight.stride(), *gctx_strides, *gp_strides,
                NEED_GW=need_w, NEED_GCTX=need_ctx, NEED_GPROMPTS=need_prompts,
                BLOCK_M=blk["bwd_m"], BLOCK_N=blk["bwd_strip_n"], BLOCK_D=blk["bwd_strip"],
                PRECISION=_DOT_PRECISION, num_warps=blk["warps"],
            )
    if gw is not None:
        gw = gw.to(weight.dtype)
    if gbias is not None:
        gbias = gbias.to(bias.dtype)
    return gctx, gprompts, gw, gbias


class _RetrievalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ctx_feat, prompts, weight, bias, beta, threshold, tau, topk):
        scores, log_q, top, (y, a, norms, cos) = _forward(ctx_feat, prompts, weight, bias, beta, threshold, tau, topk)
        ctx.save_for_backward(ctx_feat, prompts, weight, bias, y, a, norms, cos, log_q)
        ctx.hyper = (beta, threshold, tau)
        ctx.mark_non_differentiable(top)
        # Unused outputs arrive as None, so the kernel can skip their terms.
        ctx.set_materialize_grads(False)
        return scores, log_q, top

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_scores, g_logq, _g_top):
        ctx_feat, prompts, weight, bias, y, a, norms, cos, log_q = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                 bias is not None and ctx.needs_input_grad[3])
        if (g_scores is None and g_logq is None) or not any(needs):
            return (None,) * 8
        gctx, gprompts, gw, gbias = _backward(g_scores, g_logq, (y, a, norms, cos, log_q), ctx_feat, prompts,
                                              weight, bias, *ctx.hyper, needs)
        return gctx, gprompts, gw, gbias, None, None, None, None


def retrieval_triton(ctx_feat, prompts, weight, bias, *, beta: float, threshold: float, tau: float = 1.0,
                     topk: int = 1):
    _check_inputs(ctx_feat, prompts, weight, bias, tau, topk)
    return _RetrievalFunction.apply(ctx_feat, prompts, weight, bias, float(beta), float(threshold), float(tau),
                                    int(topk))


# ---------------------------------------------------------------------------------------------
# public entry points: Triton on CUDA tensors, the reference elsewhere
# ---------------------------------------------------------------------------------------------
def pool_context(embeds, lengths, start: int = 0):
    """x̄_b = mean of embeds[b, start:lengths[b]] in fp32, [B, d]. No grad (frozen embeddings)."""
    if use_triton(embeds):
        with torch.no_grad():
            return pool_context_triton(embeds, lengths, start)
    return pool_context_ref(embeds, lengths, start)


def retrieval(ctx_feat, prompts, weight, bias, *, beta: float, threshold: float, tau: float = 1.0, topk: int = 1):
    """(scores [B, K] fp32, log_q [B, K] fp32, top_idx [B, topk] int64); see retrieval_ref.

    beta/threshold are softplus's (the paper: 10 and 1, SPTConfig.score_beta/score_threshold)."""
    if use_triton(ctx_feat, prompts, weight, bias):
        return retrieval_triton(ctx_feat, prompts, weight, bias, beta=beta, threshold=threshold, tau=tau, topk=topk)
    return retrieval_ref(ctx_feat, prompts, weight, bias, beta=beta, threshold=threshold, tau=tau, topk=topk)
