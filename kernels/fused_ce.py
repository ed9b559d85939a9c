"""Fused LM head + cross-entropy on response positions: per-sequence CE for K prompts and the
prompt-fusion CE, without materialising K*B*T*V logits (DESIGN §1 losses 1 and 3, §3 kernels).

Layout of the Triton path:
- Only valid target positions become rows (padding is compacted away first), K copies for the K
  prompts plus, with scores, one "mixed" row per position: since the head is linear,
  sum_k s_k z_k = W (sum_k s_k h_k) + (sum_k s_k) bias, so fusion costs one extra row, not K.
- Forward: one kernel tiles rows x vocab, computing logits tiles with tl.dot and keeping an online
  log-sum-exp, the target logit and E_p[bias]; the vocab is split across programs so small row
  counts still fill the GPU, and the per-split partials are merged in PyTorch. Nothing V-wide is
  stored; backward keeps only the rows, their lse and a few per-row scalars.
- Backward: recompute each logits tile, turn it into coef * (softmax - onehot) and write it to a
  row-chunk buffer (bounded by _GRAD_CHUNK_ELEMS, never all rows at once), then dX = G @ W as one
  GEMM per chunk. coef carries the real upstream grads, so grad_seq may be any [K, B] tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import fused_ce_chunked
from .runtime import dot_modes, native_gpu, use_triton

IGNORE_INDEX = -100


def _check_inputs(hidden, weight, bias, targets, scores):
    if hidden.dim() != 4:
        raise ValueError(f"fused_linear_ce: hidden must be [K, B, T, d], got shape {tuple(hidden.shape)}")
    K, B, T, d = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"fused_linear_ce: weight shape {tuple(weight.shape)} must be [V, {d}]")
    V = weight.shape[0]
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"fused_linear_ce: bias shape {tuple(bias.shape)} must be [{V}]")
    if targets.shape != (B, T):
        raise ValueError(f"fused_linear_ce: targets shape {tuple(targets.shape)} must be [{B}, {T}]")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fused_linear_ce: targets must be int64 token ids, got {targets.dtype}")
    if scores is not None and scores.shape != (B, K):
        raise ValueError(f"fused_linear_ce: scores shape {tuple(scores.shape)} must be [{B}, {K}]")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        # The head is frozen in SPT and the kernel returns no weight grads; fail loudly rather than
        # silently dropping them.
        raise ValueError("fused_linear_ce: weight/bias must not require grad (the LM head is frozen)")


def _ce_math(hidden, weight, bias, targets, scores, compute_dtype):
    """Plain materialised-logits version in `compute_dtype` (tests also run it in bf16).

    Logits only at the target positions (padding has no loss): a batch of a 97- and a 12-token
    reply would otherwise spend 44% of this op's GEMMs on padding."""
    K, B, T, d = hidden.shape
    V = weight.shape[0]
    targets = targets.long()
    b_of, t_of = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # the M target positions
    y = targets[b_of, t_of]
    logits = torch.matmul(hidden[:, b_of, t_of].to(compute_dtype), weight.to(compute_dtype).t())  # [K, M, V]
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    ce = F.cross_entropy(logits.reshape(-1, V), y.repeat(K), reduction="none").view(K, -1).float()
    # Summed per sequence; a sequence with no targets sums to 0 (no NaN).
    seq_ce_sum = ce.new_zeros(K, B).index_add(1, b_of, ce)
    if scores is None:
        return seq_ce_sum, None
    # The definition, literally: mix the K logit tensors with the (unnormalised) scores.
    mixed = torch.einsum("mk,kmv->mv", scores[b_of].to(compute_dtype), logits)
    ce_mix = F.cross_entropy(mixed, y, reduction="none").float()
    n_tokens = torch.bincount(b_of, minlength=B)
    fusion = (ce_mix.new_zeros(B).index_add(0, b_of, ce_mix) / n_tokens.clamp_min(1)).mean()
    return seq_ce_sum, fusion


# The G buffer of one backward chunk holds at most this many elements (rows * V).
_GRAD_CHUNK_ELEMS = 1 << 25


@triton.jit
def _logits_tile(X, W, BIAS, bscale, rows, row_ok, cols, col_ok, D, stride_x, stride_w,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # z[BLOCK_M, BLOCK_V] = x @ w^T (+ bscale * bias) with an fp32 accumulator.
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    x_rows = rows.to(tl.int64) * stride_x
    w_rows = cols.to(tl.int64) * stride_w
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        x = tl.load(X + x_rows[:, None] + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # W rows are contiguous along d, so load [BLOCK_V, BLOCK_D] and transpose in registers.
        w = tl.load(W + w_rows[:, None] + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += bscale[:, None] * b[None, :]
    return acc


@triton.jit
def _lse_fwd_kernel(
    X, W, BIAS, BSCALE, Y, PART_M, PART_L, PART_ZY, PART_B,
    M, V, D, stride_x, stride_w, V_PER_SPLIT,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program: BLOCK_M rows x one vocab split. Writes that split's (max, sum-exp, target logit,
    # sum exp*bias) per row; the splits are merged outside (a few floats per row).
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    y = tl.load(Y + rows, mask=row_ok, other=-1)
    bscale = tl.load(BSCALE + rows, mask=row_ok, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    eb = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_start = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logits_tile(X, W, BIAS, bscale, rows, row_ok, cols, col_ok, D, stride_x, stride_w,
                         HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_D, DOT_FP32, PRECISION)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        # Every tile has at least one real column, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(z, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_BIAS:
            b = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
            eb = eb * alpha + tl.sum(p * b[None, :], 1)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        m_i = m_new
    out = pid_s * M + rows
    tl.store(PART_M + out, m_i, mask=row_ok)
    tl.store(PART_L + out, l_i, mask=row_ok)
    tl.store(PART_ZY + out, zy, mask=row_ok)
    if HAS_BIAS:
        tl.store(PART_B + out, eb, mask=row_ok)


@triton.jit
def _grad_logits_kernel(
    X, W, BIAS, BSCALE, Y, LSE, COEF, G,
    M, V, D, stride_x, stride_w, stride_g,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    # G[rows, cols] = coef * (softmax(z) - onehot(y)), z recomputed for this tile only.
    # Row blocks vary fastest, so programs running together share the same W tile in L2.
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    y = tl.load(Y + rows, mask=row_ok, other=-1)
    bscale = tl.load(BSCALE + rows, mask=row_ok, other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    coef = tl.load(COEF + rows, mask=row_ok, other=0.0)
    z = _logits_tile(X, W, BIAS, bscale, rows, row_ok, cols, col_ok, D, stride_x, stride_w,
                     HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_D, DOT_FP32, PRECISION)
    p = tl.exp(z - lse[:, None])
    g = coef[:, None] * (p - tl.where(cols[None, :] == y[:, None], 1.0, 0.0))
    ptrs = G + rows.to(tl.int64)[:, None] * stride_g + cols[None, :]
    tl.store(ptrs, g.to(G.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _pick_blocks(M, d, dtype, on_gpu):
    """(BLOCK_M, BLOCK_V, BLOCK_D, num_warps, num_stages) by heuristic (no autotune: it cannot
    run in the interpreter, and a fixed choice keeps GPU runs reproducible)."""
    block_d = min(64, max(16, triton.next_power_of_2(d)))
    if not on_gpu:
        # The interpreter pays per program and per loop step, so use few, large tiles.
        return (16 if M <= 16 else 32), 128, block_d, 4, 1
    if dtype == torch.float32:
        block_d = min(block_d, 32)  # fp32 tiles are twice the bytes; keep the pipeline in SMEM
    if M >= 2048:
        return 128, 128, block_d, 8, 3
    if M > 32:
        return 64, 128, block_d, 4, 3
    return (16 if M <= 16 else 32), 128, block_d, 4, 3


def _num_splits(row_blocks, v_tiles, device, on_gpu):
    if not on_gpu:
        return min(2, v_tiles)  # still exercises the split merge in CPU tests
    # Few rows (B=2, short responses) would leave most SMs idle: split the vocab until there are
    # about two programs per SM.
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(v_tiles, triton.cdiv(2 * n_sm, row_blocks)))


def _lse_forward(X, weight, bias, bscale, Y):
    """Per row: lse, target logit, and E_softmax[bias] (zeros without bias). All fp32 [M]."""
    M, d = X.shape
    V = weight.shape[0]
    on_gpu = native_gpu(X)
    bm, bv, bd, warps, stages = _pick_blocks(M, d, X.dtype, on_gpu)
    dot_fp32, precision = dot_modes(X.dtype, on_gpu)
    row_blocks, v_tiles = triton.cdiv(M, bm), triton.cdiv(V, bv)
    splits = _num_splits(row_blocks, v_tiles, X.device, on_gpu)
    # Whole tiles per split, so no split is empty and every row max is finite before merging.
    v_per_split = triton.cdiv(v_tiles, splits) * bv
    splits = triton.cdiv(V, v_per_split)
    part = torch.empty((4, splits, M), dtype=torch.float32, device=X.device)
    has_bias = bias is not None
    _lse_fwd_kernel[(row_blocks, splits)](
        X, weight, bias if has_bias else X, bscale, Y, part[0], part[1], part[2], part[3],
        M, V, d, X.stride(0), weight.stride(0), v_per_split,
        HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd, DOT_FP32=dot_fp32,
        PRECISION=precision, num_warps=warps, num_stages=stages,
    )
    part_m, part_l, part_zy, part_b = part
    m = part_m.max(0).values
    scale = torch.exp(part_m - m)  # [S, M]
    lse = m + torch.log((part_l * scale).sum(0))
    e_bias = (part_b * scale).sum(0) / (part_l * scale).sum(0) if has_bias else torch.zeros_like(lse)
    return lse, part_zy.sum(0), e_bias


def _grad_rows(X, weight, bias, bscale, Y, lse, coef):
    """dX [M, d] fp32 = sum_v coef * (softmax - onehot)[:, v] * W[v], G built chunk by chunk."""
    M, d = X.shape
    V = weight.shape[0]
    on_gpu = native_gpu(X)
    bm, bv, bd, warps, stages = _pick_blocks(M, d, X.dtype, on_gpu)
    dot_fp32, precision = dot_modes(X.dtype, on_gpu)
    chunk = max(bm, (_GRAD_CHUNK_ELEMS // max(V, 1)) // bm * bm)
    chunk = min(chunk, triton.cdiv(M, bm) * bm)
    # G in the head's dtype feeds a tensor-core GEMM; cuBLAS accumulates it in fp32.
    g_buf = torch.empty((chunk, V), dtype=weight.dtype, device=X.device)
    dX = torch.empty((M, d), dtype=torch.float32, device=X.device)
    has_bias = bias is not None
    for r0 in range(0, M, chunk):
        r1 = min(M, r0 + chunk)
        g = g_buf[: r1 - r0]
        _grad_logits_kernel[(triton.cdiv(r1 - r0, bm), triton.cdiv(V, bv))](
            X[r0:r1], weight, bias if has_bias else X, bscale[r0:r1], Y[r0:r1], lse[r0:r1],
            coef[r0:r1], g, r1 - r0, V, d, X.stride(0), weight.stride(0), g.stride(0),
            HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd, DOT_FP32=dot_fp32,
            PRECISION=precision, num_warps=warps, num_stages=stages,
        )
        dX[r0:r1] = _matmul_fp32_out(g, weight)
    return dX


_MM_OUT_DTYPE_OK = True


def _matmul_fp32_out(a, b):
    """a @ b with fp32 output: a bf16 dX would add a second rounding on top of G's, and the
    score grads are dot products of dX with the hidden states."""
    global _MM_OUT_DTYPE_OK
    if a.dtype == torch.float32:
        return torch.matmul(a, b)
    if a.is_cuda and _MM_OUT_DTYPE_OK:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)  # half inputs, fp32 result, one GEMM
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE_OK = False  # older torch: no mm.dtype overload
    if a.is_cuda:
        return torch.matmul(a, b).float()
    return torch.matmul(a.float(), b.float())  # CPU (interpreter tests): sizes are tiny


class FusedLinearCE(torch.autograd.Function):
    """(hidden, scores) -> (seq_ce_sum [K, B], fusion scalar); weight, bias, targets are constants.

    chunked=False: the row passes run as Triton kernels; True: in PyTorch one vocab chunk at a time
    (fused_ce_chunked), on the rows in fp32 (no rounding of the mixed row to the head's dtype)."""

    @staticmethod
    def forward(ctx, hidden, scores, weight, bias, targets, chunked=False):
        K, B, T, d = hidden.shape
        dev = hidden.device
        valid = (targets != IGNORE_INDEX).reshape(-1)
        pos = valid.nonzero().squeeze(1)  # compacting padding away is worth this one host sync
        n_pos = pos.numel()
        b_of = torch.div(pos, T, rounding_mode="floor")
        n_tokens = (targets != IGNORE_INDEX).sum(-1)
        y = targets.reshape(-1)[pos].long()
        if n_pos and bool(((y < 0) | (y >= weight.shape[0])).any()):
            raise ValueError(f"fused_linear_ce: target ids must be in [0, {weight.shape[0]}) or -100")

        h_rows = hidden.reshape(K, B * T, d)[:, pos]  # [K, n_pos, d]
        row_dtype = torch.float32 if chunked else weight.dtype
        X = [h_rows.reshape(K * n_pos, d).to(row_dtype)]
        Y = [y.repeat(K)]
        bscale = [torch.ones(K * n_pos, dtype=torch.float32, device=dev)]
        if scores is not None:
            s_rows = scores.detach().float()[b_of].t()  # [K, n_pos]
            X.append(torch.einsum("kj,kjd->jd", s_rows, h_rows.float()).to(row_dtype))
            Y.append(y)
            bscale.append(s_rows.sum(0))  # the bias enters the mixed logits sum_k s_k times
        X = torch.cat(X).contiguous()
        Y = torch.cat(Y).contiguous()
        bscale = torch.cat(bscale).contiguous()

        seq_ce_sum = torch.zeros(K * B, dtype=torch.float32, device=dev)
        fusion = torch.zeros((), dtype=torch.float32, device=dev)
        if n_pos:
            w = weight.contiguous()
            lse_forward = fused_ce_chunked.lse_forward if chunked else _lse_forward
            lse, z_y, e_bias = lse_forward(X, w, None if bias is None else bias.contiguous(), bscale, Y)
            loss = lse - z_y
            seq_id = (torch.arange(K, device=dev)[:, None] * B + b_of[None, :]).reshape(-1)
            seq_ce_sum.index_add_(0, seq_id, loss[: K * n_pos])
            if scores is not None:
                # n_tokens >= 1 wherever a position exists, so no division by zero.
                fusion = (loss[K * n_pos:] / n_tokens[b_of]).sum() / B
        else:
            lse = e_bias = torch.zeros(0, dtype=torch.float32, device=dev)
        ctx.save_for_backward(X, Y, bscale, lse, e_bias, pos, b_of, n_tokens, scores, weight, bias)
        ctx.dims = (K, B, T, d, n_pos)
        ctx.hidden_dtype = hidden.dtype
        ctx.chunked = chunked
        return seq_ce_sum.view(K, B), fusion

    @staticmethod
    def backward(ctx, grad_seq, grad_fusion):
        X, Y, bscale, lse, e_bias, pos, b_of, n_tokens, scores, weight, bias = ctx.saved_tensors
        K, B, T, d, n_pos = ctx.dims
        dev = X.device
        need_h, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros((K, B * T, d), dtype=ctx.hidden_dtype, device=dev) if need_h else None
        grad_scores = torch.zeros_like(scores) if need_s else None
        if n_pos == 0 or not (need_h or need_s):
            return (None if grad_hidden is None else grad_hidden.view(K, B, T, d)), grad_scores, None, None, None, None

        # Per-row upstream multiplier: a CE row's grad is linear in it, so one G pass serves both
        # losses and any grad_seq (sum for L_LM, anything else a caller builds).
        coef = [torch.zeros(K * n_pos, dtype=torch.float32, device=dev)]
        if grad_seq is not None:
            seq_id = (torch.arange(K, device=dev)[:, None] * B + b_of[None, :]).reshape(-1)
            coef[0] = grad_seq.float().reshape(-1)[seq_id]
        if scores is not None:
            g_fus = torch.zeros((), device=dev) if grad_fusion is None else grad_fusion.float()
            coef.append(g_fus / (B * n_tokens[b_of].float()))
        coef = torch.cat(coef).contiguous()

        grad_rows = fused_ce_chunked.grad_rows if ctx.chunked else _grad_rows
        dX = grad_rows(X, weight.contiguous(), None if bias is None else bias.contiguous(), bscale, Y, lse, coef)
        dX_seq = dX[: K * n_pos].view(K, n_pos, d)
        if scores is not None:
            dX_mix = dX[K * n_pos:]  # grad w.r.t. the mixed hidden sum_k s_k h_k
            s_rows = scores.detach().float()[b_of].t()
            if need_s:
                h_rows = X[: K * n_pos].view(K, n_pos, d)
                ds = torch.einsum("kjd,jd->kj", h_rows.float(), dX_mix)
                if bias is not None:
                    # d/dc of CE(z + c*bias) = coef * (E_p[bias] - bias[y]), and dc/ds_k = 1.
                    m_rows = slice(K * n_pos, None)
                    ds = ds + (coef[m_rows] * (e_bias[m_rows] - bias.float()[Y[m_rows]]))[None, :]
                grad_scores.index_add_(0, b_of, ds.t().to(scores.dtype))
            dX_seq = dX_seq + s_rows[:, :, None] * dX_mix[None]
        if need_h:
            grad_hidden.index_copy_(1, pos, dX_seq.to(ctx.hidden_dtype))
            grad_hidden = grad_hidden.view(K, B, T, d)
        return grad_hidden, grad_scores, None, None, None, None


def fused_linear_ce_ref(hidden, weight, bias, targets, scores=None):
    """Reference: full fp32 logits. Same signature and outputs as `fused_linear_ce`."""
    _check_inputs(hidden, weight, bias, targets, scores)
    return _ce_math(hidden, weight, bias, targets, scores, torch.float32)


def fused_linear_ce_triton(hidden, weight, bias, targets, scores=None):
    """Triton path regardless of device (tests call it on CPU tensors under TRITON_INTERPRET=1)."""
    _check_inputs(hidden, weight, bias, targets, scores)
    seq_ce_sum, fusion = FusedLinearCE.apply(hidden, scores, weight, bias, targets)
    return seq_ce_sum, (fusion if scores is not None else None)


def fused_linear_ce_chunked(hidden, weight, bias, targets, scores=None):
    """The CPU path: the same Function with its row passes in PyTorch, vocab chunk by chunk."""
    _check_inputs(hidden, weight, bias, targets, scores)
    seq_ce_sum, fusion = FusedLinearCE.apply(hidden, scores, weight, bias, targets, True)
    return seq_ce_sum, (fusion if scores is not None else None)


# Below this many bytes of fp32 logits (all K·B sequences plus the fused row) an fp32 head keeps the
# materialised reference on CPU: it saves the backward's recomputing GEMM (the chunked path runs the
# head's GEMM three times instead of two), and at this size the logits are a small part of a step.
MATERIALISE_MAX_BYTES = 256 * 2 ** 20


def use_chunked(hidden, weight, targets, scores) -> bool:
    """CPU choice: chunked for a half-precision head (the reference would copy the whole head to
    fp32 and keep it for the backward) or when the logits would pass MATERIALISE_MAX_BYTES."""
    K, _, _, _ = hidden.shape
    rows = (K + (scores is not None)) * targets.numel()
    return weight.dtype != torch.float32 or rows * weight.shape[0] * 4 > MATERIALISE_MAX_BYTES


def fused_linear_ce(hidden, weight, bias, targets, scores=None):
    """Per-sequence CE sums and the prompt-fusion loss through a frozen LM head.

    hidden [K, B, T, d] (positions predicting the targets); weight [V, d]; bias [V] or None;
    targets [B, T] int64 (-100 = padding); scores [B, K] or None.
    Returns (seq_ce_sum [K, B] fp32, fusion scalar fp32 or None), where
    fusion = mean_b mean_{valid t} CE(sum_k s[b,k] z[k,b,t], y[b,t]) (samples without targets count 0).
    Gradients flow to hidden and scores only. CUDA -> Triton; elsewhere the chunked PyTorch path
    or the reference (use_chunked).
    """
    if use_triton(hidden, weight, bias, targets, scores):
        return fused_linear_ce_triton(hidden, weight, bias, targets, scores)
    if use_chunked(hidden, weight, targets, scores):
        return fused_linear_ce_chunked(hidden, weight, bias, targets, scores)
    return fused_linear_ce_ref(hidden, weight, bias, targets, scores)


def fused_linear_ce_losses(hidden, weight, bias, targets, scores=None) -> dict:
    """The losses SPT needs from one call: per-sequence sums/means, the LM loss and fusion.

    token_mean = sum of all CE / (K * total valid tokens) is L_LM (token-weighted over K*B sequences).
    """
    seq_ce_sum, fusion = fused_linear_ce(hidden, weight, bias, targets, scores)
    K = seq_ce_sum.shape[0]
    n_tokens = (targets != IGNORE_INDEX).sum(-1)
    return {
        "seq_ce_sum": seq_ce_sum,
        "n_tokens": n_tokens,
        "seq_ce_mean": seq_ce_sum / n_tokens.clamp_min(1).to(seq_ce_sum.dtype)[None, :],
        "token_mean": seq_ce_sum.sum() / (K * n_tokens.sum()).clamp_min(1).to(seq_ce_sum.dtype),
        "fusion": fusion,
    }
