"""NF4 (bitsandbytes 4-bit NormalFloat) weights read in place: decode matmul and prefill dequantize.

Format (bitsandbytes 0.50 `Params4bit`, quant_type="nf4"): the weight W [N, K] is flattened row
by row and cut into blocks of `blocksize` values; each value is a 4-bit index into the 16-entry
NF4 code book, two per byte (the even element in the high nibble); block b is scaled by absmax[b].
With double quantization ("compress_statistics") absmax is itself 8-bit:
absmax[b] = code2[qabsmax[b]] * absmax2[b // 256] + offset.

A `NF4Group` holds one or more such layers that read the same input (q/k/v, gate/up) as
*segments*: the kernels compute all of them in one launch into one [M, sum N] output, reading
bitsandbytes' own tensors (no copy, no re-quantization, same values).

- `nf4_matmul(x [M, K], group) -> [M, sum N]`. One row (decode at batch 1): a gemv kernel; each
  program dequantizes [BLOCK_N, BLOCK_K] weight tiles in registers (code-book lookups), sums each
  block's products and scales the sum once per block; the weights are read once per step. More
  rows: `nf4_dequantize` + one dense matmul (on an H100 a fused kernel with tl.dot ran at 35-100
  GB/s for 16 rows, dequantize + cuBLAS at 2-3x that: bench/bench_nf4.py, README).
- `nf4_dequantize(group) -> [sum N, K]` in the compute dtype.
References (`*_ref`) compute the same in PyTorch from the same tensors.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .runtime import use_triton



@dataclass
class NF4Segment:
    """One bitsandbytes NF4 layer's tensors, as stored (views, no copies)."""
    packed: torch.Tensor  # uint8 [N, K // 2]
    absmax: torch.Tensor  # uint8 [N * K // blocksize] when nested, else float32
    absmax2: torch.Tensor | None  # float32 [ceil(N * K / blocksize / 256)] (nested only)
    offset: torch.Tensor | None  # float32 [1] (nested only)
    n: int
    k: int


@dataclass
class NF4Group:
    segments: list[NF4Segment]
    code: torch.Tensor  # float32 [16]: the NF4 code book
    code2: torch.Tensor | None  # float32 [256]: the absmax code book (nested only)
    blocksize: int
    nested: bool
    dtype: torch.dtype  # compute dtype (what bitsandbytes dequantizes to)

    @property
    def k(self) -> int:
        return self.segments[0].k

    @property
    def sizes(self) -> list[int]:
        return [s.n for s in self.segments]


def group_from_bnb(layers, dtype: torch.dtype | None = None) -> NF4Group:
    """An NF4Group over bitsandbytes Linear4bit layers with the same input width (no copies).

    Raises ValueError for what the kernels do not handle (fp4, a bias, K not a multiple of the
    block size, layers with different block sizes or code books, a CPU-repacked weight).
    """
    if not layers:
        raise ValueError("group_from_bnb: no layers")
    segs, ref = [], None
    for layer in layers:
        w = layer.weight
        qs = getattr(w, "quant_state", None)
        if qs is None or qs.quant_type != "nf4":
            raise ValueError(f"{type(layer).__name__}: not an NF4-quantized layer")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("NF4 weight repacked for the CPU kernel; call quant.guard_4bit first")
        if getattr(layer, "bias", None) is not None:
            raise ValueError("NF4 layers with a bias are not supported by the NF4 kernels")
        n, k = qs.shape
        if k % qs.blocksize or k % 2:
            raise ValueError(f"NF4 layer [{n}, {k}]: in_features must be a multiple of the block size "
                             f"{qs.blocksize}")
        nested = bool(qs.nested)
        if nested and qs.state2.blocksize != 256:
            raise ValueError(f"nested NF4 absmax with block size {qs.state2.blocksize} (only 256)")
        key = (qs.blocksize, nested, k)
        if ref is None:
            ref = (key, qs)
        elif key != ref[0] or not torch.equal(qs.code, ref[1].code) or \
                (nested and not torch.equal(qs.state2.code, ref[1].state2.code)):
            raise ValueError("NF4 layers in one group must share block size, nesting, input width and code books")
        segs.append(NF4Segment(
            packed=w.data.view(n, k // 2),
            absmax=qs.absmax,
            absmax2=qs.state2.absmax if nested else None,
            offset=qs.offset.reshape(1).float() if nested else None,
            n=n, k=k))
    # Each segment's blocks are numbered from 0 inside its own absmax, and the kernels index the
    # nested scales by that local number: segments need no alignment to each other.
    qs0 = ref[1]
    return NF4Group(segs, qs0.code.float(), qs0.state2.code.float() if qs0.nested else None, qs0.blocksize,
                    bool(qs0.nested), dtype or qs0.dtype)


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
def _absmax_ref(group: NF4Group, seg: NF4Segment) -> torch.Tensor:
    if not group.nested:
        return seg.absmax.float()
    q = seg.absmax.long()
    scale2 = seg.absmax2.float()[torch.arange(q.numel(), device=q.device) // 256]
    return group.code2[q] * scale2 + seg.offset


def dequantize_segment_ref(group: NF4Group, seg: NF4Segment) -> torch.Tensor:
    """W [N, K] in float32, exactly as bitsandbytes computes it before its cast."""
    b = seg.packed.reshape(-1)
    idx = torch.stack([b >> 4, b & 15], dim=-1).reshape(-1).long()
    vals = group.code[idx].view(-1, group.blocksize) * _absmax_ref(group, seg)[:, None]
    return vals.view(seg.n, seg.k)


def nf4_dequantize_ref(group: NF4Group) -> torch.Tensor:
    return torch.cat([dequantize_segment_ref(group, s) for s in group.segments]).to(group.dtype)


def nf4_matmul_ref(x: torch.Tensor, group: NF4Group) -> torch.Tensor:
    """x [M, K] @ W^T over every segment -> [M, sum N] (fp32 math, the output in x's dtype)."""
    w = torch.cat([dequantize_segment_ref(group, s) for s in group.segments])
    return (x.float() @ w.t()).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _block_scales(QA, A2, OFF, CODE2, rows, kb, NB, NESTED: tl.constexpr):
    """absmax [BLOCK_N, NBK] (fp32) of rows `rows` [BLOCK_N] (int64), row-local blocks kb [NBK]."""
    blk = rows[:, None] * NB + kb[None, :]
    if NESTED:
        q = tl.load(QA + blk).to(tl.int32)
        return tl.load(CODE2 + q) * tl.load(A2 + blk // 256) + tl.load(OFF)
    else:
        return tl.load(QA + blk).to(tl.float32)


@triton.jit
def _gemv_tile(X, W, QA, A2, OFF, CODE, CODE2, Y, pid_n, N, K, col0,
               BS: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               EVEN_K: tl.constexpr):
    # Tiles are 3-D [rows, blocks, bytes of a block] straight from memory, so each block's scale
    # broadcasts over its bytes with no reshape (a reshape can cost a trip through shared memory).
    NBK: tl.constexpr = BLOCK_K // BS
    HB: tl.constexpr = BS // 2  # bytes per block: elements 2*j (high nibble) and 2*j+1 (low)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(rn, N - 1)  # clamped: out-of-range rows read row N-1, never stored
    HK = K // 2
    NB = K // BS
    kb = tl.arange(0, NBK)
    jb = tl.arange(0, HB)
    w_ptr = W + rows.to(tl.int64)[:, None, None] * HK + (kb * HB)[None, :, None] + jb[None, None, :]
    s_off = rows[:, None] * NB + kb[None, :]  # [BLOCK_N, NBK] block numbers (of this tile's first K)
    x_off = (kb * BS)[:, None] + 2 * jb[None, :]  # [NBK, HB] even elements
    acc = tl.zeros((BLOCK_N, NBK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            byte = tl.load(w_ptr + k0 // 2)  # [BLOCK_N, NBK, HB] uint8
            blk = s_off + k0 // BS
            xe = tl.load(X + k0 + x_off).to(tl.float32)  # [NBK, HB]
            xo = tl.load(X + k0 + x_off + 1).to(tl.float32)
        else:  # the last tile runs past K: whole blocks only (K is a multiple of BS)
            live = (k0 // BS + kb) < NB  # [NBK]
            byte = tl.load(w_ptr + k0 // 2, mask=live[None, :, None], other=0)
            blk = tl.where(live[None, :], s_off + k0 // BS, 0)
            xe = tl.load(X + k0 + x_off, mask=live[:, None], other=0.0).to(tl.float32)
            xo = tl.load(X + k0 + x_off + 1, mask=live[:, None], other=0.0).to(tl.float32)
        hi = tl.load(CODE + (byte >> 4).to(tl.int32))  # code-book values
        lo = tl.load(CODE + (byte & 15).to(tl.int32))
        if NESTED:
            scale = tl.load(CODE2 + tl.load(QA + blk).to(tl.int32)) * tl.load(A2 + blk // 256) + tl.load(OFF)
        else:
            scale = tl.load(QA + blk).to(tl.float32)
        # Sum each block's products first and scale once per block; masked blocks add 0 * scale.
        acc += tl.sum(hi * xe[None, :, :] + lo * xo[None, :, :], axis=2) * scale
    tl.store(Y + col0 + rn, tl.sum(acc, axis=1).to(Y.dtype.element_ty), mask=rn < N)


@triton.jit
def _nf4_gemv_kernel(X, Y, CODE, CODE2,
                     W0, QA0, A20, OFF0, N0, P0,
                     W1, QA1, A21, OFF1, N1, P1,
                     W2, QA2, A22, OFF2, N2, K,
                     NSEG: tl.constexpr, BS: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    # Programs 0..P0-1 cover segment 0, the next P1 segment 1, the rest segment 2: one launch for
    # the q/k/v (or gate/up) layers, each read from its own bitsandbytes buffers.
    pid = tl.program_id(0)
    if NSEG == 1:
        _gemv_tile(X, W0, QA0, A20, OFF0, CODE, CODE2, Y, pid, N0, K, 0, BS, NESTED, BLOCK_N, BLOCK_K, EVEN_K)
    else:
        if pid < P0:
            _gemv_tile(X, W0, QA0, A20, OFF0, CODE, CODE2, Y, pid, N0, K, 0, BS, NESTED, BLOCK_N, BLOCK_K, EVEN_K)
        elif NSEG == 2:
            _gemv_tile(X, W1, QA1, A21, OFF1, CODE, CODE2, Y, pid - P0, N1, K, N0, BS, NESTED, BLOCK_N, BLOCK_K,
                       EVEN_K)
        elif pid < P0 + P1:
            _gemv_tile(X, W1, QA1, A21, OFF1, CODE, CODE2, Y, pid - P0, N1, K, N0, BS, NESTED, BLOCK_N, BLOCK_K,
                       EVEN_K)
        else:
            _gemv_tile(X, W2, QA2, A22, OFF2, CODE, CODE2, Y, pid - P0 - P1, N2, K, N0 + N1, BS, NESTED, BLOCK_N,
                       BLOCK_K, EVEN_K)


@triton.jit
def _dequant_tile(W, QA, A2, OFF, CODE, CODE2, OUT, pid, N, K, row0,
                  BS: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program: BLOCK_N rows of one segment, all of K, written as [BLOCK_N, K] rows of OUT.
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(rn, N - 1).to(tl.int64)
    HK = K // 2
    NB = K // BS
    jj = tl.arange(0, BLOCK_K // 2)
    kb = tl.arange(0, BLOCK_K // BS)
    keep = (rn < N)[:, None]
    out_rows = (row0 + rows)[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        byte = tl.load(W + rows[:, None] * HK + (k0 // 2 + jj)[None, :])
        scale = _block_scales(QA, A2, OFF, CODE2, rows, k0 // BS + kb, NB, NESTED)[:, :, None]
        hi = tl.reshape(tl.reshape(tl.load(CODE + (byte >> 4).to(tl.int32)), (BLOCK_N, BLOCK_K // BS, BS // 2))
                        * scale, (BLOCK_N, BLOCK_K // 2))
        lo = tl.reshape(tl.reshape(tl.load(CODE + (byte & 15).to(tl.int32)), (BLOCK_N, BLOCK_K // BS, BS // 2))
                        * scale, (BLOCK_N, BLOCK_K // 2))
        # Back in element order (even, odd, even, ...) so the store is one contiguous row piece.
        vals = tl.interleave(hi, lo)  # [BLOCK_N, BLOCK_K]
        tl.store(OUT + out_rows + (k0 + tl.arange(0, BLOCK_K))[None, :], vals.to(OUT.dtype.element_ty), mask=keep)


@triton.jit
def _nf4_dequant_kernel(OUT, CODE, CODE2,
                        W0, QA0, A20, OFF0, N0, P0,
                        W1, QA1, A21, OFF1, N1, P1,
                        W2, QA2, A22, OFF2, N2, K,
                        NSEG: tl.constexpr, BS: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    if NSEG == 1:
        _dequant_tile(W0, QA0, A20, OFF0, CODE, CODE2, OUT, pid, N0, K, 0, BS, NESTED, BLOCK_N, BLOCK_K)
    else:
        if pid < P0:
            _dequant_tile(W0, QA0, A20, OFF0, CODE, CODE2, OUT, pid, N0, K, 0, BS, NESTED, BLOCK_N, BLOCK_K)
        elif NSEG == 2:
            _dequant_tile(W1, QA1, A21, OFF1, CODE, CODE2, OUT, pid - P0, N1, K, N0, BS, NESTED, BLOCK_N,
                          BLOCK_K)
        elif pid < P0 + P1:
            _dequant_tile(W1, QA1, A21, OFF1, CODE, CODE2, OUT, pid - P0, N1, K, N0, BS, NESTED, BLOCK_N,
                          BLOCK_K)
        else:
            _dequant_tile(W2, QA2, A22, OFF2, CODE, CODE2, OUT, pid - P0 - P1, N2, K, N0 + N1, BS, NESTED,
                          BLOCK_N, BLOCK_K)


def _block_k(k: int, blocksize: int, want: int, divide: bool = False) -> int:
    # A power-of-two number of whole blocks, at most `want` elements and no wider than K needs;
    # with divide=True also a divisor of K (for a kernel without K masks).
    bk = blocksize
    while bk * 2 <= want and bk < k and (not divide or k % (bk * 2) == 0):
        bk *= 2
    return bk


def _segment_args(group: NF4Group, block_n: int):
    segs = group.segments
    if len(segs) > 3:
        raise ValueError(f"NF4 kernels take at most 3 segments per group, got {len(segs)}")
    args = []
    for i in range(3):
        s = segs[min(i, len(segs) - 1)]
        a2 = s.absmax2 if group.nested else s.absmax  # unused pointers when not nested
        off = s.offset if group.nested else s.absmax
        args += [s.packed, s.absmax, a2, off, s.n]
        if i < 2:
            args.append(triton.cdiv(s.n, block_n))
    grid = sum(triton.cdiv(s.n, block_n) for s in segs)
    code2 = group.code2 if group.nested else group.code
    return args, grid, code2


# Tile shapes (measured on an H100 by bench/bench_nf4.py: see README). The interpreter runs tiny
# tiles; there every program costs ~0.5 ms whatever its size.
GEMV_BLOCK_N, GEMV_BLOCK_K, GEMV_WARPS = 8, 512, 4
DEQ_BLOCK_N, DEQ_BLOCK_K, DEQ_WARPS = 16, 512, 4


def _load_tiles() -> None:
    """SPT_FAST_NF4_TILES=file.json (as written by bench/bench_nf4.py --write) overrides the tiles,
    for another GPU: {"gemv": {"block_n": .., "block_k": .., "num_warps": ..}}."""
    global GEMV_BLOCK_N, GEMV_BLOCK_K, GEMV_WARPS
    path = os.environ.get("SPT_FAST_NF4_TILES")
    if not path:
        return
    try:
        with open(path) as f:
            cfg = json.load(f)
        g = cfg.get("gemv", {})
        GEMV_BLOCK_N = int(g.get("block_n", GEMV_BLOCK_N))
        GEMV_BLOCK_K = int(g.get("block_k", GEMV_BLOCK_K))
        GEMV_WARPS = int(g.get("num_warps", GEMV_WARPS))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"SPT_FAST_NF4_TILES={path}: not a readable tiles file ({exc})") from exc


_load_tiles()


def nf4_matmul_triton(x: torch.Tensor, group: NF4Group, block_n: int | None = None, block_k: int | None = None,
                      num_warps: int | None = None) -> torch.Tensor:
    """One input row (decode at batch 1): x [1, K] -> [1, sum N]."""
    if x.dim() != 2 or x.shape[1] != group.k:
        raise ValueError(f"nf4_matmul: x must be [M, {group.k}], got {tuple(x.shape)}")
    if x.shape[0] != 1:
        raise ValueError(f"nf4_matmul: {x.shape[0]} rows; the kernel takes one (more: nf4_dequantize + matmul)")
    x = x.contiguous()
    bn = block_n or GEMV_BLOCK_N
    bk = _block_k(group.k, group.blocksize, block_k or GEMV_BLOCK_K)
    y = torch.empty(1, sum(group.sizes), device=x.device, dtype=x.dtype)
    args, grid, code2 = _segment_args(group, bn)
    _nf4_gemv_kernel[(grid,)](x, y, group.code, code2, *args, group.k, NSEG=len(group.segments),
                              BS=group.blocksize, NESTED=group.nested, BLOCK_N=bn, BLOCK_K=bk,
                              EVEN_K=group.k % bk == 0, num_warps=num_warps or GEMV_WARPS)
    return y


def nf4_dequantize_triton(group: NF4Group, block_n: int | None = None, block_k: int | None = None,
                          num_warps: int | None = None) -> torch.Tensor:
    bn = block_n or DEQ_BLOCK_N
    bk = _block_k(group.k, group.blocksize, block_k or DEQ_BLOCK_K, divide=True)
    seg0 = group.segments[0]
    out = torch.empty(sum(group.sizes), group.k, device=seg0.packed.device, dtype=group.dtype)
    args, grid, code2 = _segment_args(group, bn)
    _nf4_dequant_kernel[(grid,)](out, group.code, code2, *args, group.k, NSEG=len(group.segments),
                                 BS=group.blocksize, NESTED=group.nested, BLOCK_N=bn, BLOCK_K=bk,
                                 num_warps=num_warps or DEQ_WARPS)
    return out


def nf4_matmul(x: torch.Tensor, group: NF4Group) -> torch.Tensor:
    """x [M, K] @ W^T over every segment -> [M, sum N]: the gemv kernel for one row (decode at batch
    1), else the weights dequantized once and one dense matmul (prefill, batched decode)."""
    if use_triton(x, group.segments[0].packed):
        if x.shape[0] == 1:
            return nf4_matmul_triton(x, group)
        return torch.nn.functional.linear(x, nf4_dequantize_triton(group).to(x.dtype))
    return nf4_matmul_ref(x, group)


def nf4_dequantize(group: NF4Group) -> torch.Tensor:
    if use_triton(group.segments[0].packed):
        return nf4_dequantize_triton(group)
    return nf4_dequantize_ref(group)


# ---------------------------------------------------------------------------------------------
# a custom op: opaque to torch.compile (it traces none of the launch logic) and CUDA-graphable
# ---------------------------------------------------------------------------------------------
def _group_from_lists(packed, absmax, absmax2, offset, code, code2, blocksize, nested, dtype) -> NF4Group:
    segs = [NF4Segment(p, a, a2 if nested else None, o if nested else None, p.shape[0], p.shape[1] * 2)
            for p, a, a2, o in zip(packed, absmax, absmax2, offset)]
    return NF4Group(segs, code, code2 if nested else None, blocksize, nested, dtype)


@torch.library.custom_op("spt_fast::nf4_matmul", mutates_args=())
def _nf4_matmul_op(x: torch.Tensor, packed: list[torch.Tensor], absmax: list[torch.Tensor],
                   absmax2: list[torch.Tensor], offset: list[torch.Tensor], code: torch.Tensor, code2: torch.Tensor,
                   blocksize: int, nested: bool) -> torch.Tensor:
    return nf4_matmul(x, _group_from_lists(packed, absmax, absmax2, offset, code, code2, blocksize, nested, x.dtype))


@_nf4_matmul_op.register_fake
def _(x, packed, absmax, absmax2, offset, code, code2, blocksize, nested):
    return x.new_empty(x.shape[0], sum(p.shape[0] for p in packed))


def _op_args(group: NF4Group):
    segs = group.segments
    # Not-nested groups pass their absmax again in the unused slots (ops take no None in lists).
    return ([s.packed for s in segs], [s.absmax for s in segs],
            [s.absmax2 if group.nested else s.absmax for s in segs],
            [s.offset if group.nested else s.absmax for s in segs],
            group.code, group.code2 if group.nested else group.code, group.blocksize, group.nested)


def nf4_linear(x: torch.Tensor, group: NF4Group) -> torch.Tensor:
    """x [..., K] -> [..., sum N] (nf4_matmul on the flattened rows). Compiled code calls it through
    a custom op (works under torch.compile and CUDA graphs); eager calls skip the op's dispatch."""
    x2 = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        y = _nf4_matmul_op(x2, *_op_args(group))
    else:
        y = nf4_matmul(x2, group)
    return y.reshape(*x.shape[:-1], y.shape[-1])
