"""A CPU pass's layers in one C call (cpu_native.c: spt_decode_layers).

An eager or compiled decode step is ~10 operators a layer; one row through the embedded model
made ~300 calls a step, each with its own fixed cost (dispatch, an OpenMP fork, an allocation), which
in the int4 step outweighed reading the weights (7.3 ms a step for 2.4 ms of bytes, AMD EPYC). The
C call runs every layer in one OpenMP region on the same kernels the per-layer path uses (the dense
products, the int8/int4 tiles, the decode attention), rounding the activations where the PyTorch
layers do. Each token comes with its position and its cache row, so one call serves a decode step
(one token a row), a prefill (a row's tokens at positions 0..T-1) and the server's joint pass
(decoding rows' tokens beside new rows' prefills): a prefill's norms, rotary, SiLU and copies no
longer cost an operator each (in bf16 they were about a fifth of the embedded model's 136-token
prefill). It serves a pass when every projection of the model runs on those kernels for that many
rows; otherwise the per-layer path stays. SPT_FAST_FUSED_DECODE=0 turns it off.
"""
from __future__ import annotations

import ctypes
import os

import torch

from . import cpu_native

i64, ptr = ctypes.c_int64, ctypes.c_void_p


class _Proj(ctypes.Structure):
    _fields_ = [("kind", i64), ("n", i64), ("k", i64), ("group", i64), ("w", ptr), ("scale", ptr), ("low", ptr)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ptr), ("ffn_norm", ptr), ("qkv", _Proj), ("o", _Proj), ("gate_up", _Proj),
                ("down", _Proj), ("k_cache", ptr), ("v_cache", ptr)]


class _Shape(ctypes.Structure):
    _fields_ = [("B", i64), ("dim", i64), ("H", i64), ("Hkv", i64), ("D", i64), ("F", i64), ("S", i64),
                ("row_stride", i64), ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("bf", ctypes.c_int),
                ("threads", ctypes.c_int), ("cos", ptr), ("sin", ptr), ("final_norm", ptr), ("tiles", ctypes.c_int),
                ("head", _Proj), ("logits", ptr), ("vocab", i64)]


def fused_decode_enabled() -> bool:
    """Whether the C step may serve (the kernels built, SPT_FAST_FUSED_DECODE not 0)."""
    return os.environ.get("SPT_FAST_FUSED_DECODE", "1") != "0" and _library() is not None


def _library():
    lib = cpu_native.library()
    if lib is None or not hasattr(lib, "spt_decode_layers"):
        return None
    if not getattr(lib, "_fused_typed", False):
        lib.spt_decode_work_bytes.argtypes = [ctypes.POINTER(_Shape), i64, i64]
        lib.spt_decode_work_bytes.restype = i64
        lib.spt_decode_layers.argtypes = [ctypes.POINTER(_Layer), i64, ctypes.POINTER(_Shape), ptr, ptr, ptr, i64,
                                          i64, ptr]
        lib.spt_decode_layers.restype = None
        lib._fused_typed = True
    return lib


def _proj(m, dtype, keep: list):
    """(the projection as the C step takes it, the module if it is dense: its kernel choice decides
    which batch sizes the step serves), or None where it does not run on those kernels."""
    from .cpu_projections import CPUProjection, QuantProjection

    if isinstance(m, CPUProjection):
        if m.native is None or m.w0.dtype != dtype:
            return None
        keep.append(m.native.detach())
        return _Proj(0, sum(m.sizes), m.w0.shape[1], 0, m.native.data_ptr(), None, None), m
    if isinstance(m, QuantProjection) and m.native and m.dtype == dtype:
        n = m.q.shape[0] * cpu_native.TILE
        if m.bits == 8:
            keep += [m.q, m.scale]
            return _Proj(1, n, m.q.shape[1], 0, m.q.data_ptr(), m.scale.data_ptr(), None), None
        keep += [m.q, m.scale, m.low]
        return _Proj(2, n, m.q.shape[1] * 8, m.group, m.q.data_ptr(), m.scale.data_ptr(), m.low.data_ptr()), None
    return None


class FusedDecode:
    """The C decode step for one compact Llama view whose projections attach_cpu_projections set up."""

    def __init__(self, llama, layers, dense, keep, nmax: int, kmax: int, tiles_ok: bool = True, head=None):
        cfg = llama.config
        self.layers, self.dense, self.keep = layers, dense, keep
        # The LM head where it runs on the same kernels: (its _Proj, its module if dense, its width)
        self.head = head
        self.tiles_ok = tiles_ok  # the int projections (if any) can run many rows as dense tiles
        self.nmax, self.kmax = nmax, kmax
        self._applies: dict[int, bool] = {}  # rows -> applies(rows) (the kernel choices are fixed)
        self._head_applies: dict[int, bool] = {}
        self.dtype = llama.norm.weight.dtype
        self.max_positions = llama.rope_cos.shape[0]  # rows of the rotary tables C reads
        self.shape = _Shape(0, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size, 0, 0,
                            cfg.rms_norm_eps, cfg.head_dim ** -0.5, int(self.dtype == torch.bfloat16), 1,
                            llama.rope_cos.data_ptr(), llama.rope_sin.data_ptr(), llama.norm.weight.data_ptr(), 0,
                            head[0] if head is not None else _Proj(), None, head[2] if head is not None else 0)
        self._caches = None  # the cache pointers last written into the layer array
        self._cache_rows = 0  # ... and the fewest rows any of those caches has
        self._work = {}

    def __deepcopy__(self, memo):
        # A copy would hold the original weights' addresses (the copy's are elsewhere): a deep copy
        # of the model decodes layer by layer instead.
        return None

    @classmethod
    def attach(cls, llama) -> "FusedDecode | None":
        """Build the step for this view (None where some layer is not on the C kernels)."""
        lib = _library()
        cfg = llama.config
        dtype = llama.norm.weight.dtype
        if lib is None or not fused_decode_enabled() or dtype not in (
                torch.float32, torch.bfloat16) or not llama.native_attention or cfg.n_heads % cfg.n_kv_heads \
                or cfg.n_heads * cfg.head_dim != cfg.dim or cfg.head_dim % 2:
            return None
        # (detached: the storages themselves stay alive, whatever later replaces a Parameter's data)
        keep, dense, nmax, kmax = [llama.rope_cos, llama.rope_sin, llama.norm.weight.detach()], [], 0, 0
        tiles_ok = True
        layers = (_Layer * len(llama.layers))()
        for i, block in enumerate(llama.layers):
            a, f = block.attention, block.feed_forward
            modules = (a.fused_qkv, a.wo, f.fused_gate_up, f.w2)
            parts = [_proj(m, dtype, keep) for m in modules]
            tiles_ok = tiles_ok and all(getattr(m, "prefill_native", True) for m in modules)
            if any(p is None for p in parts):
                return None
            for (proj, module), want_n, want_k in zip(parts, (None, cfg.dim, None, cfg.dim),
                                                      (cfg.dim, cfg.dim, cfg.dim, cfg.intermediate_size)):
                if proj.k != want_k or (want_n is not None and proj.n < want_n):
                    return None
                if module is not None:
                    dense.append(module)
                nmax, kmax = max(nmax, proj.n), max(kmax, proj.k)
            qkv, gate_up = parts[0][0], parts[2][0]
            if qkv.n < cfg.dim + 2 * cfg.n_kv_heads * cfg.head_dim or gate_up.n < 2 * cfg.intermediate_size:
                return None
            for norm in (block.attention_norm.weight, block.ffn_norm.weight):
                if norm.dtype != dtype or not norm.is_contiguous():
                    return None
            keep += [block.attention_norm.weight.detach(), block.ffn_norm.weight.detach()]
            layers[i] = _Layer(block.attention_norm.weight.data_ptr(), block.ffn_norm.weight.data_ptr(),
                               *(p[0] for p in parts), None, None)
        head = _proj(llama.output, dtype, keep)
        if head is not None and head[0].k == cfg.dim:
            head = (*head, sum(llama.output.sizes))
        else:
            head = None
        return cls(llama, layers, dense, keep, nmax, kmax, tiles_ok, head)

    def applies(self, rows: int) -> bool:
        """Whether `rows` tokens run here: every dense projection chose the C kernel for that many
        rows (cpu_projections.choose_kernels measured it); int ones take up to KERNEL_ROWS rows on
        their own kernels, more (a prefill) as dequantized tiles on the dense kernel, where it has
        a vector path for the dtype."""
        from .cpu_projections import QuantProjection

        ok = self._applies.get(rows)
        if ok is None:
            ok = self._applies[rows] = (rows <= QuantProjection.KERNEL_ROWS or self.tiles_ok) and all(
                m.kernel_for(rows) == "native" for m in self.dense)
        return ok

    def applies_head(self, rows: int) -> bool:
        """Whether the call can end with the LM head for `rows` tokens (logits=True): the head runs
        on these kernels (a dense one: chose the C kernel for that many rows)."""
        ok = self._head_applies.get(rows)
        if ok is None:
            module = self.head[1] if self.head is not None else None
            ok = self._head_applies[rows] = self.head is not None and self.applies(rows) and (
                module is None or module.kernel_for(rows) == "native")
        return ok

    def __call__(self, embeds: torch.Tensor, pos: torch.Tensor, caches, rows: torch.Tensor | None = None,
                 logits: bool = False) -> torch.Tensor:
        """embeds [M, dim] (the model's dtype), one token each; pos [M] int64 (each token's
        position); rows [M] int64, each token's cache row (None: token i is row i). A token's K/V go
        to slot pos of its row, and it attends to slots 0..pos of the row once every token of the
        call has written its own: several tokens of one row are that row's prefill (or what follows
        a cached prefix). Returns hidden [M, dim] after the final norm, or with logits=True (where
        applies_head) the LM head's fp32 logits [M, vocab] (the head's output in the model's dtype,
        widened: as llama.logits(hidden).float())."""
        from .cpu_projections import QuantProjection

        lib = _library()
        k0 = caches[0].k_cache
        B, S = embeds.shape[0], k0.shape[2]
        if embeds.dim() != 2 or embeds.shape[1] != self.shape.dim or embeds.dtype != self.dtype:
            raise ValueError(f"fused decode: embeddings must be [rows, {self.shape.dim}] {self.dtype}")
        if len(caches) != len(self.layers) or S > self.max_positions:
            raise ValueError(f"fused decode: {len(caches)} caches of {S} slots for {len(self.layers)} layers "
                             f"of {self.max_positions} positions")
        if rows is not None:
            rows = rows.to(torch.int64).contiguous()
            need = int(rows.max()) + 1 if rows.numel() else 0
            if rows.shape != (B,) or (rows.numel() and int(rows.min()) < 0):
                raise ValueError(f"fused decode: cache rows must be {B} values >= 0")
        else:
            need = B
        key = (S, *[a for c in caches for a in c.addresses()])
        if self._caches != key or self._cache_rows < need:
            self._caches = None  # (a check failing half-way leaves some layers' pointers changed)
            want = (self.shape.Hkv, S, self.shape.D)
            for layer, c in zip(self.layers, caches):  # C addresses every slot from these
                for t in (c.k_cache, c.v_cache):
                    if tuple(t.shape[1:]) != want or t.shape[0] < need or t.dtype != self.dtype \
                            or t.stride(0) != k0.stride(0) or not t[0].is_contiguous():
                        raise ValueError(f"fused decode: each cache must be [>= {need}, {want[0]}, {S}, {want[2]}] "
                                         f"{self.dtype}, rows contiguous and equally far apart")
                layer.k_cache, layer.v_cache = c.k_cache.data_ptr(), c.v_cache.data_ptr()
            self._caches = key
            self._cache_rows = min(t.shape[0] for c in caches for t in (c.k_cache, c.v_cache))
        shape = self.shape
        tiles = int(B > QuantProjection.KERNEL_ROWS)
        shape.B, shape.S, shape.row_stride, shape.threads = B, S, k0.stride(0), torch.get_num_threads()
        shape.tiles = tiles
        out = None
        if logits:
            if not self.applies_head(B):
                raise ValueError(f"fused decode: the LM head does not run here for {B} rows")
            out = torch.empty(B, self.head[2], dtype=torch.float32)
        shape.logits = None if out is None else out.data_ptr()
        nmax = max(self.nmax, self.head[0].n) if logits else self.nmax  # (the head's rows: only then)
        work = self._work.get((B, S, shape.threads, tiles, nmax))
        if work is None:
            self._work.clear()
            size = lib.spt_decode_work_bytes(ctypes.byref(shape), nmax, self.kmax)
            work = self._work[(B, S, shape.threads, tiles, nmax)] = torch.empty(size, dtype=torch.uint8)
        x = embeds.contiguous().clone()  # (written in place)
        pos = pos.to(torch.int64).contiguous()
        low, high = torch.aminmax(pos) if pos.numel() else (torch.tensor(0), torch.tensor(S))
        if pos.shape != (B,) or int(low) < 0 or int(high) >= S:  # C writes at these slots
            raise ValueError(f"fused decode: positions must be {B} values in 0..{S - 1}")
        lib.spt_decode_layers(self.layers, len(self.layers), ctypes.byref(shape), x.data_ptr(), pos.data_ptr(),
                              None if rows is None else rows.data_ptr(), nmax, self.kmax, work.data_ptr())
        return x if out is None else out
