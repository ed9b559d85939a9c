"""Branch attention for the shared layout: K*B branches attend to their sample's context KV + own causal KV.

The context KV is stored once per sample (batch B) and read by all K branches of that sample; the
two parts are merged by log-sum-exp (Hydragen / cascade attention). Only the branch q/k/v get grads.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .runtime import dot_modes, native_gpu, use_triton

_LOG2E = 1.4426950408889634


def _check_inputs(q, k, v, ctx_k, ctx_v, ctx_len, sample_of):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or ctx_k.dim() != 4 or ctx_v.dim() != 4:
        raise ValueError("branch_attention: q, k, v, ctx_k, ctx_v must be 4-D [batch, heads, time, dim]")
    n, h, tb, d = q.shape
    if k.shape != v.shape or k.shape[0] != n or k.shape[2] != tb or k.shape[3] != d:
        raise ValueError(f"branch_attention: k/v shape {tuple(k.shape)}/{tuple(v.shape)} does not match q {tuple(q.shape)}")
    hkv = k.shape[1]
    if h % hkv != 0:
        raise ValueError(f"branch_attention: query heads {h} not a multiple of kv heads {hkv}")
    if ctx_k.shape != ctx_v.shape or ctx_k.shape[1] != hkv or ctx_k.shape[3] != d:
        raise ValueError(f"branch_attention: ctx_k/ctx_v shape {tuple(ctx_k.shape)} must be [B, {hkv}, Tc, {d}]")
    if ctx_len.shape != (ctx_k.shape[0],):
        raise ValueError(f"branch_attention: ctx_len shape {tuple(ctx_len.shape)} must be [{ctx_k.shape[0]}]")
    if sample_of.shape != (n,):
        raise ValueError(f"branch_attention: sample_of shape {tuple(sample_of.shape)} must be [{n}]")
    if not (q.dtype == k.dtype == v.dtype == ctx_k.dtype == ctx_v.dtype):
        raise ValueError("branch_attention: q, k, v, ctx_k, ctx_v must share one dtype")
    if torch.is_grad_enabled() and (ctx_k.requires_grad or ctx_v.requires_grad):
        # The kernel returns no context grads; failing loudly beats silently dropping them.
        raise ValueError("branch_attention: ctx_k/ctx_v must not require grad (compute the context under no_grad)")


def _attention_math(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale, compute_dtype):
    """Plain masked softmax attention over [context | branch] in `compute_dtype` (tests also use bf16)."""
    n, h, tb, d = q.shape
    hkv, tc = k.shape[1], ctx_k.shape[2]
    group = h // hkv
    sample_of = sample_of.to(q.device, torch.long)
    ctx_len = ctx_len.to(q.device, torch.long)
    # Gathering K copies of the context is fine here: this is the obviously-correct version.
    keys = torch.cat([ctx_k[sample_of], k], dim=2).to(compute_dtype)
    values = torch.cat([ctx_v[sample_of], v], dim=2).to(compute_dtype)
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    ctx_ok = torch.arange(tc, device=q.device)[None, :] < ctx_len[sample_of][:, None]  # [N, Tc]
    own_ok = torch.ones(tb, tb, dtype=torch.bool, device=q.device).tril()  # [Tb, Tb]
    allowed = torch.cat([ctx_ok[:, None, :].expand(n, tb, tc), own_ok[None].expand(n, tb, tb)], dim=2)
    scores = torch.matmul(q.to(compute_dtype), keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, values).to(q.dtype)


@triton.jit
def _online_softmax_step(acc, m_i, l_i, scores, v, PRECISION: tl.constexpr):
    # scores are already scaled into the log2 domain and masked with -inf.
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # A row that has seen nothing yet keeps m = -inf; pin it to 0 so exp2 never sees -inf - -inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, CK, CV, CTX_LEN, SAMPLE_OF, OUT, LSE,
    sq_n, sq_h, sq_t, sq_d,
    sk_n, sk_h, sk_t, sk_d,
    sv_n, sv_h, sv_t, sv_d,
    sck_b, sck_h, sck_t, sck_d,
    scv_b, scv_h, scv_t, scv_d,
    so_n, so_h, so_t, so_d,
    H, GROUP, TB, TC, D, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // H).to(tl.int64)
    h = (pid_nh % H).to(tl.int64)
    kvh = h // GROUP
    s = tl.load(SAMPLE_OF + n).to(tl.int64)
    clen = tl.minimum(tl.load(CTX_LEN + s).to(tl.int32), TC)  # never read past the stored context

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < TB
    d_ok = offs_d < D

    q = tl.load(Q + n * sq_n + h * sq_h + rows[:, None] * sq_t + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Context part: one running softmax state over the sample's shared context (no causal mask).
    ck_base = CK + s * sck_b + kvh * sck_h
    cv_base = CV + s * scv_b + kvh * scv_h
    for start in range(0, clen, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < clen
        kt = tl.load(ck_base + cols[None, :] * sck_t + offs_d[:, None] * sck_d,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vb = tl.load(cv_base + cols[:, None] * scv_t + offs_d[None, :] * scv_d,
                     mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
            vb = vb.to(tl.float32)
        scores = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, scores, vb, PRECISION)

    # Own causal part. Continuing the same (m, l, acc) is exactly the log-sum-exp merge of the
    # two partial attentions, without a second accumulator.
    k_base = K + n * sk_n + kvh * sk_h
    v_base = V + n * sv_n + kvh * sv_h
    hi = tl.minimum((pid_m + 1) * BLOCK_M, TB)
    for start in range(0, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < TB
        kt = tl.load(k_base + cols[None, :] * sk_t + offs_d[:, None] * sk_d,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vb = tl.load(v_base + cols[:, None] * sv_t + offs_d[None, :] * sv_d,
                     mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
            vb = vb.to(tl.float32)
        scores = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        ok = (cols[None, :] <= rows[:, None]) & col_ok[None, :]
        scores = tl.where(ok, scores, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, scores, vb, PRECISION)

    # Every row sees its own position 0, so l_i > 0 (padded rows included): no NaN.
    out = acc / l_i[:, None]
    tl.store(OUT + n * so_n + h * so_h + rows[:, None] * so_t + offs_d[None, :] * so_d,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_nh.to(tl.int64) * TB + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, CK, CV, CTX_LEN, SAMPLE_OF, DO, LSE, DELTA, DQ,
    sq_n, sq_h, sq_t, sq_d,
    sk_n, sk_h, sk_t, sk_d,
    sv_n, sv_h, sv_t, sv_d,
    sck_b, sck_h, sck_t, sck_d,
    scv_b, scv_h, scv_t, scv_d,
    sdo_n, sdo_h, sdo_t, sdo_d,
    sdq_n, sdq_h, sdq_t, sdq_d,
    H, GROUP, TB, TC, D, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // H).to(tl.int64)
    h = (pid_nh % H).to(tl.int64)
    kvh = h // GROUP
    s = tl.load(SAMPLE_OF + n).to(tl.int64)
    clen = tl.minimum(tl.load(CTX_LEN + s).to(tl.int32), TC)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < TB
    d_ok = offs_d < D
    qmask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + n * sq_n + h * sq_h + rows[:, None] * sq_t + offs_d[None, :] * sq_d, mask=qmask, other=0.0)
    do = tl.load(DO + n * sdo_n + h * sdo_h + rows[:, None] * sdo_t + offs_d[None, :] * sdo_d, mask=qmask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_nh.to(tl.int64) * TB + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_nh.to(tl.int64) * TB + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # dq gets contributions from the context keys too (they are constants, but q is not).
    ck_base = CK + s * sck_b + kvh * sck_h
    cv_base = CV + s * scv_b + kvh * scv_h
    for start in range(0, clen, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < clen
        kvmask = col_ok[:, None] & d_ok[None, :]
        kb = tl.load(ck_base + cols[:, None] * sck_t + offs_d[None, :] * sck_d, mask=kvmask, other=0.0)
        vb = tl.load(cv_base + cols[:, None] * scv_t + offs_d[None, :] * scv_d, mask=kvmask, other=0.0)
        if DOT_FP32:
            kb = kb.to(tl.float32)
            vb = vb.to(tl.float32)
        scores = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * qk_scale
        p = tl.where(col_ok[None, :], tl.exp2(scores - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vb), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kb.dtype), kb, input_precision=PRECISION)

    k_base = K + n * sk_n + kvh * sk_h
    v_base = V + n * sv_n + kvh * sv_h
    hi = tl.minimum((pid_m + 1) * BLOCK_M, TB)
    for start in range(0, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < TB
        kvmask = col_ok[:, None] & d_ok[None, :]
        kb = tl.load(k_base + cols[:, None] * sk_t + offs_d[None, :] * sk_d, mask=kvmask, other=0.0)
        vb = tl.load(v_base + cols[:, None] * sv_t + offs_d[None, :] * sv_d, mask=kvmask, other=0.0)
        if DOT_FP32:
            kb = kb.to(tl.float32)
            vb = vb.to(tl.float32)
        scores = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * qk_scale
        ok = (cols[None, :] <= rows[:, None]) & col_ok[None, :]
        p = tl.where(ok, tl.exp2(scores - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vb), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kb.dtype), kb, input_precision=PRECISION)

    tl.store(DQ + n * sdq_n + h * sdq_h + rows[:, None] * sdq_t + offs_d[None, :] * sdq_d,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sq_n, sq_h, sq_t, sq_d,
    sk_n, sk_h, sk_t, sk_d,
    sv_n, sv_h, sv_t, sv_d,
    sdo_n, sdo_h, sdo_t, sdo_d,
    sdk_n, sdk_h, sdk_t, sdk_d,
    sdv_n, sdv_h, sdv_t, sdv_d,
    H, HKV, GROUP, TB, D, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program owns a block of one branch's kv positions for all GROUP query heads that share
    # it, so dk/dv are written once with no atomics. Context kv needs no gradient.
    pid_n = tl.program_id(0)
    pid_nk = tl.program_id(1)
    n = (pid_nk // HKV).to(tl.int64)
    kvh = (pid_nk % HKV).to(tl.int64)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < TB
    d_ok = offs_d < D
    kvmask = col_ok[:, None] & d_ok[None, :]

    kb = tl.load(K + n * sk_n + kvh * sk_h + cols[:, None] * sk_t + offs_d[None, :] * sk_d, mask=kvmask, other=0.0)
    vb = tl.load(V + n * sv_n + kvh * sv_h + cols[:, None] * sv_t + offs_d[None, :] * sv_d, mask=kvmask, other=0.0)
    if DOT_FP32:
        kb = kb.to(tl.float32)
        vb = vb.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Causal: only query rows >= the block's first column see it (query tiles need no alignment).
    lo = pid_n * BLOCK_N
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        nh = n * H + h
        q_base = Q + n * sq_n + h * sq_h
        do_base = DO + n * sdo_n + h * sdo_h
        for start in range(lo, TB, BLOCK_M):
            rows = start + offs_m
            row_ok = rows < TB
            qmask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * sq_t + offs_d[None, :] * sq_d, mask=qmask, other=0.0)
            do = tl.load(do_base + rows[:, None] * sdo_t + offs_d[None, :] * sdo_d, mask=qmask, other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + nh * TB + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + nh * TB + rows, mask=row_ok, other=0.0)
            # Transposed scores [BLOCK_N, BLOCK_M] so dk/dv accumulate without a transpose of p.
            scores_t = tl.dot(kb, tl.trans(q), input_precision=PRECISION) * qk_scale
            ok = (cols[:, None] <= rows[None, :]) & row_ok[None, :] & col_ok[:, None]
            p_t = tl.where(ok, tl.exp2(scores_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(vb, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    tl.store(DK + n * sdk_n + kvh * sdk_h + cols[:, None] * sdk_t + offs_d[None, :] * sdk_d,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kvmask)
    tl.store(DV + n * sdv_n + kvh * sdv_h + cols[:, None] * sdv_t + offs_d[None, :] * sdv_d,
             dv.to(DV.dtype.element_ty), mask=kvmask)


def _pick_blocks(tb: int, d: int, elem_bytes: int, on_gpu: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_M for dk/dv, num_warps, num_stages) by heuristic: no autotune in the interpreter.

    GPU choices were checked by compiling for sm_80/sm_90 and reading register/shared use: bf16
    tiles of 64x64 fit (<= 66 KB shared) with no spills, except the dk/dv kernel at D > 64 which
    needs a 32-row query tile. fp32 (tests only, exact 'ieee' products) needs smaller tiles.
    """
    if not on_gpu:
        # Interpreter cost is per program and per loop step, not per element: few, wide blocks.
        bm = min(64, max(16, triton.next_power_of_2(tb)))
        return bm, bm, bm, 4, 1
    warps = 4 if d <= 64 else 8
    if elem_bytes >= 4:
        return 32, 32, 16, warps, 2
    return 64, 64, (64 if d <= 64 else 32), warps, 2


def _index_tensors(ctx_len, sample_of, device):
    return (ctx_len.to(device=device, dtype=torch.int32).contiguous(),
            sample_of.to(device=device, dtype=torch.int32).contiguous())


def _forward(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale):
    n, h, tb, d = q.shape
    hkv, tc = k.shape[1], ctx_k.shape[2]
    on_gpu = native_gpu(q)
    bm, bn, _, warps, stages = _pick_blocks(tb, d, q.element_size(), on_gpu)
    dot_fp32, precision = dot_modes(q.dtype, on_gpu)
    out = torch.empty((n, h, tb, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((n, h, tb), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(tb, bm), n * h)
    _fwd_kernel[grid](
        q, k, v, ctx_k, ctx_v, ctx_len, sample_of, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *ctx_k.stride(), *ctx_v.stride(), *out.stride(),
        h, h // hkv, tb, tc, d, scale * _LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(d)),
        DOT_FP32=dot_fp32, PRECISION=precision, num_warps=warps, num_stages=stages,
    )
    return out, lse


def _backward(do, q, k, v, ctx_k, ctx_v, ctx_len, sample_of, out, lse, scale):
    n, h, tb, d = q.shape
    hkv, tc = k.shape[1], ctx_k.shape[2]
    on_gpu = native_gpu(q)
    bm, bn, bm_kv, warps, stages = _pick_blocks(tb, d, q.element_size(), on_gpu)
    dot_fp32, precision = dot_modes(q.dtype, on_gpu)
    block_d = max(16, triton.next_power_of_2(d))
    # delta_i = sum_d dO*O (FA2 preprocessing): one cheap elementwise pass, left to PyTorch.
    delta = (do.float() * out.float()).sum(-1).contiguous()
    dq = torch.empty((n, h, tb, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((n, hkv, tb, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((n, hkv, tb, d), dtype=v.dtype, device=v.device)
    common = dict(BLOCK_D=block_d, DOT_FP32=dot_fp32, PRECISION=precision, num_warps=warps, num_stages=stages)
    _bwd_dq_kernel[(triton.cdiv(tb, bm), n * h)](
        q, k, v, ctx_k, ctx_v, ctx_len, sample_of, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *ctx_k.stride(), *ctx_v.stride(), *do.stride(), *dq.stride(),
        h, h // hkv, tb, tc, d, scale * _LOG2E, scale, BLOCK_M=bm, BLOCK_N=bn, **common,
    )
    _bwd_dkdv_kernel[(triton.cdiv(tb, bn), n * hkv)](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        h, hkv, h // hkv, tb, d, scale * _LOG2E, scale, BLOCK_M=bm_kv, BLOCK_N=bn, **common,
    )
    return dq, dk, dv


class BranchAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale):
        ctx_len, sample_of = _index_tensors(ctx_len, sample_of, q.device)
        out, lse = _forward(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale)
        # Saved for an FA2-style recompute: inputs, output and the row log2-sum-exp (fp32, N*H*Tb);
        # no probabilities, no gathered context.
        ctx.save_for_backward(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, ctx_k, ctx_v, ctx_len, sample_of, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, ctx_k, ctx_v, ctx_len, sample_of, out, lse, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def branch_attention_ref(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale: float | None = None):
    """Reference: gather each branch's context, mask, softmax in fp32. Same signature as the kernel."""
    _check_inputs(q, k, v, ctx_k, ctx_v, ctx_len, sample_of)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _attention_math(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale, torch.float32)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    SDPA's backward returns the keys' and values' gradient in a [N, T, H, D] memory layout; the
    branch's own part is then a slice of it along T, and after the head reshape the projection's
    output gradient is a [N, Tb, d] view whose batch dims do not fold. torch.matmul then expands
    the weight to [N, d_out, d_in] and copies it for a bmm: for an NF4 7B layer that dequantized
    copy was 1 GiB (N=32, 4096x4096 bf16), the largest part of the step's peak memory.
    """

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


# Above this many bytes of gathered context K/V per layer (N·Tc·2·d_kv) the CPU path groups the
# branches by sample instead. Below it gathering is cheaper: the grouped form also computes the
# masked cross-branch blocks (SmolLM2 chit-chat training, 6 MB a layer: ~4% slower grouped).
GATHER_MAX_BYTES = 16 * 2 ** 20


def branch_attention_sdpa(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale: float | None = None):
    """The CPU path: fused SDPA calls with a boolean mask.

    Small shapes gather each branch's context (one SDPA call over [context | own keys]). Large
    ones (GATHER_MAX_BYTES), when every sample has the same number of branches (training: K per
    sample), group the branches by sample instead: one query row per sample holds all its
    branches' tokens [K·Tb] and attends to [its context | every branch's own keys] under a
    block-causal mask. The keys then hold the context once per sample, so memory grows with
    B·Tc + N·Tb, not N·Tc (a 7B step gathered 150 MiB per layer for K=4), at the price of the
    masked cross-branch blocks' arithmetic.
    """
    _check_inputs(q, k, v, ctx_k, ctx_v, ctx_len, sample_of)
    k, v = _ContiguousGrad.apply(k), _ContiguousGrad.apply(v)
    n, h, tb, d = q.shape
    bsz, hkv, tc, _ = ctx_k.shape
    sample_of = sample_of.to(q.device, torch.long)
    lens = ctx_len.to(q.device, torch.long)
    per = n // bsz
    small = n * tc * 2 * hkv * d * ctx_k.element_size() <= GATHER_MAX_BYTES
    if small or n % bsz or not bool((torch.bincount(sample_of, minlength=bsz) == per).all()):
        return _sdpa_gathered(q, k, v, ctx_k, ctx_v, lens, sample_of, scale)
    order = torch.sort(sample_of, stable=True).indices  # rows of sample 0, then 1, ...

    def grouped(x):  # [N, H, Tb, D] -> [B, H, per·Tb, D], each sample's branches one after another
        return x[order].view(bsz, per, x.shape[1], tb, d).transpose(1, 2).reshape(bsz, x.shape[1], per * tb, d)

    keys = torch.cat([ctx_k, grouped(k)], dim=2)
    values = torch.cat([ctx_v, grouped(v)], dim=2)
    ctx_ok = torch.arange(tc, device=q.device)[None, :] < lens[:, None]  # [B, Tc]
    own_ok = torch.block_diag(*[torch.ones(tb, tb, dtype=torch.bool, device=q.device).tril()] * per)
    allowed = torch.cat([ctx_ok[:, None, :].expand(bsz, per * tb, tc), own_ok[None].expand(bsz, -1, -1)], dim=2)
    out = F.scaled_dot_product_attention(grouped(q), keys, values, attn_mask=allowed[:, None], scale=scale,
                                         enable_gqa=h != hkv)
    out = out.view(bsz, h, per, tb, d).transpose(1, 2).reshape(n, h, tb, d)
    return out[torch.argsort(order)]


def _sdpa_gathered(q, k, v, ctx_k, ctx_v, lens, sample_of, scale):
    n, h, tb, _ = q.shape
    tc = ctx_k.shape[2]
    keys = torch.cat([ctx_k[sample_of], k], dim=2)
    values = torch.cat([ctx_v[sample_of], v], dim=2)
    ctx_ok = torch.arange(tc, device=q.device)[None, :] < lens[sample_of][:, None]
    own_ok = torch.ones(tb, tb, dtype=torch.bool, device=q.device).tril()
    allowed = torch.cat([ctx_ok[:, None, :].expand(n, tb, tc), own_ok[None].expand(n, tb, tb)], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None], scale=scale,
                                          enable_gqa=h != k.shape[1])


def branch_attention_triton(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale: float | None = None):
    """Triton path regardless of device (tests call it on CPU tensors under TRITON_INTERPRET=1)."""
    _check_inputs(q, k, v, ctx_k, ctx_v, ctx_len, sample_of)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return BranchAttention.apply(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale)


def branch_attention(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale: float | None = None):
    """out[n, h, i] = softmax attention of q[n, h, i] over ctx[sample_of[n], :ctx_len] and k[n, :, :i+1].

    q [N, H, Tb, D]; k, v [N, Hkv, Tb, D]; ctx_k, ctx_v [B, Hkv, Tc, D] (no grad); ctx_len [B];
    sample_of [N] (int, any device). Returns [N, H, Tb, D] in q's dtype. CUDA -> Triton, else one
    masked SDPA call (`branch_attention_sdpa`, checked against the reference in the tests).
    """
    if use_triton(q, k, v, ctx_k, ctx_v):
        return branch_attention_triton(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale)
    return branch_attention_sdpa(q, k, v, ctx_k, ctx_v, ctx_len, sample_of, scale)


