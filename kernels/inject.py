"""Batched prompt injection: scatter the selected (or all K) soft prompts into the input
embedding buffer at each row's prompt position, no Python loop over rows (DESIGN §3 kernels).

out[n] = tok[row_src[n], :pos_n] ++ prompts[prompt_idx[n]] ++ tok[row_src[n], pos_n:]

row_src lets the "all K prompts" layout (N = K*B rows, row_src[n] = n % B) read the B token rows
directly, so K copies of the tokens never exist before the output buffer.

Triton path: the forward is one gather-copy kernel (each program fills a [slots x d] tile of one
output row, choosing per slot between the token row and the prompt). The backward is two
gather-add kernels, one program per output tile of the gradient, each looping over the N rows in
order: deterministic, no atomics. N is K*B (tens of rows), so the loop is cheap.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import device_guard, native_gpu, use_triton


def _check_inputs(token_embeds, prompts, row_src, prompt_idx, prompt_pos):
    if token_embeds.dim() != 3:
        raise ValueError(f"inject_prompts: token_embeds must be [B, T, d], got shape {tuple(token_embeds.shape)}")
    d = token_embeds.shape[2]
    if prompts.dim() != 3 or prompts.shape[2] != d:
        raise ValueError(f"inject_prompts: prompts shape {tuple(prompts.shape)} must be [K, L, {d}]")
    if row_src.dim() != 1 or prompt_idx.shape != row_src.shape or prompt_pos.shape != row_src.shape:
        raise ValueError(
            f"inject_prompts: row_src {tuple(row_src.shape)}, prompt_idx {tuple(prompt_idx.shape)} and prompt_pos "
            f"{tuple(prompt_pos.shape)} must all be [N]"
        )
    for name, t in (("row_src", row_src), ("prompt_idx", prompt_idx), ("prompt_pos", prompt_pos)):
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"inject_prompts: {name} must be an integer tensor, got {t.dtype}")
    # Range checks only where they are free: a device tensor would cost a host sync per call.
    B, T = token_embeds.shape[:2]
    K = prompts.shape[0]
    for name, t, hi in (("row_src", row_src, B - 1), ("prompt_idx", prompt_idx, K - 1), ("prompt_pos", prompt_pos, T)):
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) > hi):
            got = f"[{int(t.min())}, {int(t.max())}]"
            raise ValueError(f"inject_prompts: {name} values must lie in [0, {hi}], got {got}")


def inject_prompts_ref(token_embeds, prompts, row_src, prompt_idx, prompt_pos):
    """out[n] = tok[row_src[n], :pos] ++ prompts[prompt_idx[n]] ++ tok[row_src[n], pos:] (dtype of tok)."""
    _check_inputs(token_embeds, prompts, row_src, prompt_idx, prompt_pos)
    B, T, d = token_embeds.shape
    L = prompts.shape[1]
    dev = token_embeds.device
    j = torch.arange(T + L, device=dev)[None, :]  # output slot
    pos = prompt_pos.to(dev)[:, None]
    in_prompt = (j >= pos) & (j < pos + L)
    tok_j = torch.where(j < pos, j, j - L).clamp(0, max(T - 1, 0))  # source token slot outside the prompt
    if T == 0:  # nothing to gather; every slot is a prompt slot
        toks = token_embeds.new_zeros(row_src.shape[0], L, d)
    else:
        toks = token_embeds[row_src.to(dev)[:, None], tok_j]  # [N, T+L, d]
    if L == 0:
        return toks
    pr = prompts.to(token_embeds.dtype)[prompt_idx.to(dev)[:, None], (j - pos).clamp(0, max(L - 1, 0))]
    return torch.where(in_prompt[:, :, None], pr, toks)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _inject_fwd_kernel(TOK, PROMPTS, ROW_SRC, PIDX, PPOS, OUT,
                       T, L, D,
                       s_tb, s_tt, s_td, s_pk, s_pl, s_pd, s_on, s_ot, s_od,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # output slots
    dd = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    src = tl.load(ROW_SRC + n).to(tl.int64)
    k = tl.load(PIDX + n).to(tl.int64)
    pos = tl.load(PPOS + n).to(tl.int32)
    jmask = j < T + L
    dmask = dd[None, :] < D
    in_prompt = (j >= pos) & (j < pos + L)
    tj = tl.where(j < pos, j, j - L)
    x = tl.load(TOK + src * s_tb + tj[:, None] * s_tt + dd[None, :] * s_td,
                mask=(jmask & ((j < pos) | (j >= pos + L)))[:, None] & dmask, other=0.0)
    p = tl.load(PROMPTS + k * s_pk + (j - pos)[:, None] * s_pl + dd[None, :] * s_pd,
                mask=(jmask & in_prompt)[:, None] & dmask, other=0.0)
    out = tl.where(in_prompt[:, None], p, x)
    tl.store(OUT + n * s_on + j[:, None] * s_ot + dd[None, :] * s_od, out, mask=jmask[:, None] & dmask)


@triton.jit
def _grad_prompts_kernel(GOUT, PIDX, PPOS, GP,
                         N, L, D,
                         s_gn, s_gt, s_gd, s_pk, s_pl, s_pd,
                         BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    k = tl.program_id(0)
    l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    dd = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    tile_mask = (l < L)[:, None] & (dd < D)[None, :]
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    # Rows in a fixed order: the same sum every run. Rows of other prompts load nothing (masked).
    row = GOUT  # advanced one row per step: pointer arithmetic stays 64-bit on any N * stride
    for n in range(N):
        # Broadcast the row's prompt id over the tile (the interpreter rejects scalar-bool masks).
        hit = (l * 0 + tl.load(PIDX + n)) == k
        pos = tl.load(PPOS + n).to(tl.int32)
        ptr = row + (pos + l)[:, None] * s_gt + dd[None, :] * s_gd
        acc += tl.load(ptr, mask=tile_mask & hit[:, None], other=0.0).to(tl.float32)
        row += s_gn
    tl.store(GP + k.to(tl.int64) * s_pk + l[:, None] * s_pl + dd[None, :] * s_pd, acc, mask=tile_mask)


@triton.jit
def _grad_tokens_kernel(GOUT, ROW_SRC, PPOS, GT,
                        N, T, L, D,
                        s_gn, s_gt, s_gd, s_tb, s_tt, s_td,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    dd = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    tile_mask = (t < T)[:, None] & (dd < D)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    row = GOUT
    for n in range(N):
        hit = (t * 0 + tl.load(ROW_SRC + n)) == b
        pos = tl.load(PPOS + n).to(tl.int32)
        slot = tl.where(t < pos, t, t + L)  # token t sits after the prompt once t >= pos
        ptr = row + slot[:, None] * s_gt + dd[None, :] * s_gd
        acc += tl.load(ptr, mask=tile_mask & hit[:, None], other=0.0).to(tl.float32)
        row += s_gn
    tl.store(GT + b.to(tl.int64) * s_tb + t[:, None] * s_tt + dd[None, :] * s_td, acc, mask=tile_mask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _pick_blocks(rows: int, d: int, on_gpu: bool):
    """(BLOCK_ROWS, BLOCK_D) for a [rows x d] copy tile. GPU: ~4K elements per program, enough
    programs to fill the SMs on a pure copy. Interpreter: one program per row (each costs ~0.5 ms)."""
    if on_gpu:
        block_d = max(16, min(256, triton.next_power_of_2(max(d, 1))))
        block_rows = max(1, min(4096 // block_d, triton.next_power_of_2(max(rows, 1))))
    else:
        block_d = max(16, min(1024, triton.next_power_of_2(max(d, 1))))
        block_rows = max(1, min(64, triton.next_power_of_2(max(rows, 1))))
    return block_rows, block_d


def _index(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device).contiguous()


def _forward(token_embeds, prompts, row_src, prompt_idx, prompt_pos):
    B, T, d = token_embeds.shape
    L = prompts.shape[1]
    N = row_src.shape[0]
    out = torch.empty(N, T + L, d, device=token_embeds.device, dtype=token_embeds.dtype)
    if out.numel() == 0:
        return out
    on_gpu = native_gpu(token_embeds)
    bt, bd = _pick_blocks(T + L, d, on_gpu)
    with device_guard(token_embeds):
        _inject_fwd_kernel[(N, triton.cdiv(T + L, bt), triton.cdiv(d, bd))](
            token_embeds, prompts, row_src, prompt_idx, prompt_pos, out, T, L, d,
            *token_embeds.stride(), *prompts.stride(), *out.stride(), BLOCK_T=bt, BLOCK_D=bd,
        )
    return out


def _backward(grad_out, tok_shape, prompts_shape, tok_dtype, prompts_dtype, row_src, prompt_idx, prompt_pos,
              need_tok, need_prompts):
    B, T, d = tok_shape
    K, L, _ = prompts_shape
    N = row_src.shape[0]
    dev = grad_out.device
    on_gpu = native_gpu(grad_out)
    g_tok = g_prompts = None
    with device_guard(grad_out):
        if need_prompts:
            g_prompts = torch.empty(prompts_shape, device=dev, dtype=prompts_dtype)
            if g_prompts.numel():
                bl, bd = _pick_blocks(L, d, on_gpu)
                _grad_prompts_kernel[(K, triton.cdiv(L, bl), triton.cdiv(d, bd))](
                    grad_out, prompt_idx, prompt_pos, g_prompts, N, L, d,
                    *grad_out.stride(), *g_prompts.stride(), BLOCK_L=bl, BLOCK_D=bd,
                )
        if need_tok:
            g_tok = torch.empty(tok_shape, device=dev, dtype=tok_dtype)
            if g_tok.numel():
                bt, bd = _pick_blocks(T, d, on_gpu)
                _grad_tokens_kernel[(B, triton.cdiv(T, bt), triton.cdiv(d, bd))](
                    grad_out, row_src, prompt_pos, g_tok, N, T, L, d,
                    *grad_out.stride(), *g_tok.stride(), BLOCK_T=bt, BLOCK_D=bd,
                )
    return g_tok, g_prompts


class _InjectFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_embeds, prompts, row_src, prompt_idx, prompt_pos):
        ctx.save_for_backward(row_src, prompt_idx, prompt_pos)
        ctx.meta = (token_embeds.shape, prompts.shape, token_embeds.dtype, prompts.dtype)
        # Cast the (small) prompts once up front: the kernel stays a plain copy, and the rounding is
        # torch's (the Triton interpreter truncates fp32 -> bf16 instead of rounding to nearest).
        # The backward still writes prompt grads in the prompts' own dtype from fp32 sums.
        return _forward(token_embeds, prompts.to(token_embeds.dtype), row_src, prompt_idx, prompt_pos)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        row_src, prompt_idx, prompt_pos = ctx.saved_tensors
        need_tok, need_prompts = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_tok, g_prompts = _backward(grad_out, *ctx.meta, row_src, prompt_idx, prompt_pos, need_tok, need_prompts)
        return g_tok, g_prompts, None, None, None


def inject_prompts_triton(token_embeds, prompts, row_src, prompt_idx, prompt_pos):
    _check_inputs(token_embeds, prompts, row_src, prompt_idx, prompt_pos)
    dev = token_embeds.device
    if prompts.device != dev:
        raise ValueError(f"inject_prompts: prompts on {prompts.device} but token_embeds on {dev}")
    return _InjectFunction.apply(token_embeds, prompts, _index(row_src, dev), _index(prompt_idx, dev),
                                 _index(prompt_pos, dev))


def inject_prompts(token_embeds, prompts, row_src, prompt_idx, prompt_pos):
    """[N, T+L, d] rows with prompt prompt_idx[n] at slot prompt_pos[n] of token row row_src[n]."""
    if use_triton(token_embeds, prompts):
        return inject_prompts_triton(token_embeds, prompts, row_src, prompt_idx, prompt_pos)
    return inject_prompts_ref(token_embeds, prompts, row_src, prompt_idx, prompt_pos)
