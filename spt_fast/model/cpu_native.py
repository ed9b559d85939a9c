"""CPU kernels in C, built at first use: dense fp32 / bf16 and weight-only int8 / int4 products (a
decode step's projections), the attention of one query token per row over a static KV cache, and
the causal attention of a prefill.

PyTorch's own kernels for this (aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu) read the
weights at 10-13 GB/s of the ~30 a decode step could stream, which left `--weights int8|int4` no
faster than the compiled bf16 step. The kernels in cpu_native.c (tile layouts described there) are
built once per machine with the system C compiler and kept under the cache folder; where that is
impossible (no compiler) `library()` is None and QuantProjection keeps PyTorch's kernels.

Each competes with PyTorch's own by measurement (cpu_projections: choose_kernels, choose_quant_kernels,
choose_decode_attention, choose_prefill_attention). They are registered as PyTorch operators
(`torch.ops.spt_fast.dense_mm`, `int8_mm`, `int4_mm`, `decode_attention`, `causal_attention`), so
a compiled decode step calls them in place, as one graph.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_native.c")
TILE = 32  # output rows per tile (cpu_native.c's T)
VEC = 16  # output rows per vector of the dense layouts (cpu_native.c's V)
GROUP = 48  # output rows per group of the dense layout (cpu_native.c's DNB * V)

_lock = threading.Lock()
_lib = None
_tried = False


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model name and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields.get("model name", "") + "|" + fields.get("flags", "")


def _build(compiler: str, target: Path) -> None:
    """Compile the source into `target` atomically (a temporary sibling renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    # -fopenmp links libgomp.so.1; torch has loaded its own copy under that name, which the
    # loader then reuses: one OpenMP thread pool for torch and these kernels, not two competing.
    cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", str(tmp), "-lm"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def find_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def built_path(compiler: str) -> Path:
    """Where the build for this source, compiler and CPU is kept."""
    from .loading import cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + compiler.encode() + _cpu_signature().encode()).hexdigest()[:16]
    return cache_dir() / "native" / f"cpu_native-{key}.so"


def library():
    """The built kernels (a ctypes library), or None where they cannot be built or loaded (one warning;
    SPT_FAST_NATIVE_KERNELS=0 turns them off)."""
    global _lib, _tried
    if _lib is not None:  # every kernel call asks: no lock once loaded
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("SPT_FAST_NATIVE_KERNELS", "1") == "0" or platform.system() != "Linux":
            return None
        compiler = find_compiler()
        if compiler is None:
            warnings.warn("no C compiler found: the CPU engine uses PyTorch's kernels (slower here)",
                          stacklevel=2)
            return None
        target = built_path(compiler)
        try:
            if not target.exists():
                _build(compiler, target)
            try:
                lib = ctypes.CDLL(str(target))  # after torch (imported above) loaded its libgomp
            except OSError:
                target.unlink(missing_ok=True)  # unloadable: the next run builds it again
                raise
            lib.spt_dense_group.restype = ctypes.c_int64
            if lib.spt_quant_tile() != TILE or lib.spt_dense_group() != GROUP:
                raise RuntimeError(f"tile {lib.spt_quant_tile()} != {TILE} or group {lib.spt_dense_group()} != {GROUP}")
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            warnings.warn(f"building the CPU kernels of {SOURCE.name} failed ({exc}); the CPU engine uses "
                          "PyTorch's kernels (slower here)", stacklevel=2)
            return None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.spt_int8_mm.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        lib.spt_int4_mm.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
        lib.spt_dense_mm.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ctypes.c_int]
        lib.spt_dense_mm_rowmajor.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ctypes.c_int, ptr,
                                              ctypes.c_int]
        lib.spt_quant_prefill.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int, ptr,
                                          ctypes.c_int]
        lib.spt_causal_attention.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_float,
                                             ctypes.c_int, ctypes.c_int]
        lib.spt_decode_attention.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_float,
                                             ctypes.c_int, ctypes.c_int]
        lib.spt_argmax_rows.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_int]
        for fn in (lib.spt_int8_mm, lib.spt_dense_mm, lib.spt_dense_mm_rowmajor, lib.spt_quant_prefill,
                   lib.spt_argmax_rows):
            fn.restype = None
        for fn in (lib.spt_int4_mm, lib.spt_decode_attention, lib.spt_causal_attention):
            fn.restype = ctypes.c_int  # nonzero: its scratch could not be allocated
        _lib = lib
        return _lib


def int4_rounds_to_bf16() -> bool:
    """Whether the built int4 kernel takes its activations in bf16 (CPUs with AVX-512 BF16)."""
    return bool(library().spt_int4_bf16())


# ---- packing (plain [n, k] integers -> the kernels' tiles) and the dense weights back ----

def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """[n, k] int8 (n a multiple of TILE) -> [n / TILE, k, TILE]."""
    n, k = q.shape
    return q.reshape(n // TILE, TILE, k).transpose(1, 2).contiguous()


def unpack_int8(tiles: torch.Tensor) -> torch.Tensor:
    return tiles.transpose(1, 2).reshape(-1, tiles.shape[1])


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[n, k] integers 0..15 (n a multiple of TILE, k of 8) -> [n / TILE, k / 8, TILE] int32 words,
    nibble i of a word holding column 8 b + i."""
    n, k = q.shape
    nibbles = q.to(torch.int64).reshape(n, k // 8, 8)
    words = (nibbles << (4 * torch.arange(8))).sum(-1)  # < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(n // TILE, TILE, k // 8).transpose(1, 2).contiguous()


def pack_int4_groups(t: torch.Tensor) -> torch.Tensor:
    """Per-group scales or offsets [k / group, n] (n a multiple of TILE) -> [n / TILE, k / group, TILE]
    (the int4 kernels take them in bf16)."""
    groups, n = t.shape
    return t.reshape(groups, n // TILE, TILE).transpose(0, 1).contiguous()


def unpack_int4(words: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: [n, k] int32 values 0..15."""
    tiles, blocks, _ = words.shape
    q = (words[..., None] >> (4 * torch.arange(8, dtype=torch.int32))) & 15  # [t, b, TILE, 8]
    return q.permute(0, 2, 1, 3).reshape(tiles * TILE, blocks * 8)


def dense_applies(weight: torch.Tensor) -> bool:
    """Whether dense_mm serves this [n, k] weight: its dtype has a vector path in the build (fp32
    with AVX-512, bf16 with AVX-512 BF16), n a multiple of VEC and k of 8."""
    lib = library()
    if lib is None or weight.dim() != 2 or weight.shape[0] % VEC or weight.shape[1] % 8:
        return False
    need = {torch.float32: 1, torch.bfloat16: 2}.get(weight.dtype)
    return need is not None and bool(lib.spt_dense_vector() & need)


_HUGE = 2 << 20  # a transparent huge page on x86-64 Linux


def in_huge_pages(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of `tensors`, one after another in one region advised for transparent huge
    pages (Linux; elsewhere the advice is skipped). A decode step streams every weight once: with
    4 KiB pages each page starts with misses the prefetchers do not cover (they stop at page
    boundaries); the kernels alone, one row through the embedded model's bf16 projections, took
    7.9-8.3 ms in 2 MiB pages against 9.9-10.2 ms in 4 KiB ones (alternating, in one process)."""
    sizes = [(t.numel() * t.element_size() + 63) // 64 * 64 for t in tensors]  # 64-byte aligned starts
    total = sum(sizes)
    advised = (total + _HUGE - 1) // _HUGE * _HUGE
    raw = torch.empty(advised + _HUGE, dtype=torch.uint8)  # not touched yet: advise, then fill
    start = (-raw.data_ptr()) % _HUGE
    if platform.system() == "Linux" and total >= _HUGE:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(raw.data_ptr() + start), ctypes.c_size_t(advised), 14)  # MADV_HUGEPAGE
        except (OSError, AttributeError):
            pass  # 4 KiB pages, as any tensor
    out, at = [], start
    for t, size in zip(tensors, sizes):
        nbytes = t.numel() * t.element_size()
        view = raw[at:at + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
        at += size
    return out


def pack_dense(w: torch.Tensor) -> torch.Tensor:
    """[n, k] fp32 / bf16 (n a multiple of VEC) -> cpu_native.c's layout, flat: groups of GROUP
    output rows (the last one smaller), each [k][rows] (fp32) or [k / 2][rows][2] (bf16)."""
    n, k = w.shape
    full = n // GROUP * GROUP
    parts = [(w[:full], GROUP)] if full else []
    if n > full:
        parts.append((w[full:], n - full))
    out = []
    for part, width in parts:
        g = part.shape[0] // width
        if w.dtype == torch.bfloat16:
            out.append(part.reshape(g, width, k // 2, 2).permute(0, 2, 1, 3).reshape(-1))
        else:
            out.append(part.reshape(g, width, k).transpose(1, 2).reshape(-1))
    return torch.cat(out) if len(out) > 1 else out[0].contiguous()


def unpack_dense(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of pack_dense: [n, k]."""
    n = packed.numel() // k
    full = n // GROUP * GROUP
    rows, at = [], 0
    for width, count in ((GROUP, full // GROUP), (n - full, 1 if n > full else 0)):
        size = width * k * count
        part = packed[at:at + size]
        at += size
        if not count:
            continue
        if packed.dtype == torch.bfloat16:
            rows.append(part.reshape(count, k // 2, width, 2).permute(0, 2, 1, 3).reshape(count * width, k))
        else:
            rows.append(part.reshape(count, k, width).transpose(1, 2).reshape(count * width, k))
    return torch.cat(rows)


# ---- the operators ----
# Defined through torch.library.Library rather than the torch.library.custom_op decorator: its
# extra layers cost ~9 us a call (15 against 6.4), and a decode step makes 121 of them.

_ops = torch.library.Library("spt_fast", "FRAGMENT")  # the namespace has other ops (custom_op)
_ops.define("int8_mm(Tensor x, Tensor q, Tensor scale) -> Tensor")
_ops.define("int4_mm(Tensor x, Tensor q, Tensor scale, Tensor low, int group) -> Tensor")
_ops.define("dense_mm(Tensor x, Tensor w) -> Tensor")
_ops.define("dense_mm_rowmajor(Tensor x, Tensor w, bool trans) -> Tensor")
_ops.define("quant_prefill(Tensor x, Tensor q, Tensor scale, Tensor? low, int group, int bits) -> Tensor")
_ops.define("causal_attention(Tensor q, Tensor k, Tensor v) -> Tensor")
_ops.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor pos) -> Tensor")


def _checked(name: str, status: int) -> None:
    if status:
        raise MemoryError(f"cpu_native {name}: its scratch memory could not be allocated")


def _int8_mm(x, q, scale):
    x = x.contiguous()
    m, k = x.shape
    y = x.new_empty(m, q.shape[0] * TILE)
    library().spt_int8_mm(x.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), m, y.shape[1], k,
                          torch.get_num_threads())
    return y


def _int4_mm(x, q, scale, low, group):
    x = x.contiguous()
    m, k = x.shape
    y = x.new_empty(m, q.shape[0] * TILE)
    _checked("int4_mm", library().spt_int4_mm(x.data_ptr(), q.data_ptr(), scale.data_ptr(), low.data_ptr(),
                                              y.data_ptr(), m, y.shape[1], k, group, torch.get_num_threads()))
    return y


def _dense_mm(x, w):
    x = x.contiguous()
    m, k = x.shape
    y = x.new_empty(m, w.numel() // k)
    library().spt_dense_mm(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, y.shape[1], k, int(x.dtype == torch.bfloat16),
                           torch.get_num_threads())
    return y


def _dense_mm_rowmajor(x, w, trans):
    if w.dim() == 2 and not w.is_contiguous() and w.t().is_contiguous():
        w, trans = w.t(), not trans  # a column-major weight is its transpose stored row-major: no copy
    if not rowmajor_applies(x, w, trans) or x.dim() != 2:
        raise ValueError(f"dense_mm_rowmajor: x {tuple(x.shape)} {x.dtype} against w {tuple(w.shape)} {w.dtype} "
                         f"(trans={trans}): needs CPU fp32/bf16 alike, matching widths, n % {VEC} == 0, k % 8 == 0")
    x, w = x.contiguous(), w.contiguous()
    m, k = x.shape
    n = w.shape[1] if trans else w.shape[0]
    y = x.new_empty(m, n)
    threads = torch.get_num_threads()
    work = x.new_empty(threads, GROUP * k)  # each thread's packed group
    library().spt_dense_mm_rowmajor(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, n, k, int(x.dtype == torch.bfloat16),
                                    int(trans), work.data_ptr(), threads)
    return y


def _quant_prefill(x, q, scale, low, group, bits):
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        raise ValueError(f"quant_prefill: x must be CPU fp32/bf16 [m, k], got {tuple(x.shape)} {x.dtype}")
    m, k = x.shape
    n = q.shape[0] * TILE
    if bits == 8:
        ok = q.dtype == torch.int8 and q.shape[1:] == (k, TILE) and scale.dtype == torch.float32 and scale.numel() == n
    else:
        shape = (q.shape[0], k // group, TILE) if group and k % group == 0 else None
        ok = (bits == 4 and low is not None and q.dtype == torch.int32 and q.shape[1:] == (k // 8, TILE)
              and shape is not None and scale.shape == low.shape == shape
              and scale.dtype == low.dtype == torch.bfloat16 and group % 8 == 0)
    if not ok or k % 8:
        raise ValueError(f"quant_prefill: int{bits} weights {tuple(q.shape)} {q.dtype} do not fit x {tuple(x.shape)} "
                         f"(group {group})")
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    low = None if low is None else low.contiguous()
    y = x.new_empty(m, n)
    threads = torch.get_num_threads()
    work = x.new_empty(threads, TILE * k)  # each thread's dequantized tile
    library().spt_quant_prefill(x.data_ptr(), q.data_ptr(), scale.data_ptr(), 0 if low is None else low.data_ptr(),
                                y.data_ptr(), m, n, k, group, bits, int(x.dtype == torch.bfloat16), work.data_ptr(),
                                threads)
    return y


def _causal_attention(q, k, v):
    b, h, t, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    _checked("causal_attention", library().spt_causal_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, k.shape[1], t, d, d ** -0.5,
        int(q.dtype == torch.bfloat16), torch.get_num_threads()))
    return out


def _decode_attention(q, k, v, pos):
    b, h, _, d = q.shape
    hkv, slots = k.shape[1], k.shape[2]
    q, k, v, pos = q.contiguous(), k.contiguous(), v.contiguous(), pos.contiguous()
    out = torch.empty_like(q)
    _checked("decode_attention", library().spt_decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), pos.data_ptr(), out.data_ptr(), b, h, hkv, slots, d, d ** -0.5,
        int(q.dtype == torch.bfloat16), torch.get_num_threads()))
    return out


_ops.impl("decode_attention", _decode_attention, "CPU")
_ops.impl("int8_mm", _int8_mm, "CPU")
_ops.impl("int4_mm", _int4_mm, "CPU")
_ops.impl("dense_mm", _dense_mm, "CPU")
_ops.impl("dense_mm_rowmajor", _dense_mm_rowmajor, "CPU")
_ops.impl("quant_prefill", _quant_prefill, "CPU")
_ops.impl("causal_attention", _causal_attention, "CPU")


@torch.library.register_fake("spt_fast::int8_mm")
def _(x, q, scale):
    return x.new_empty(x.shape[0], q.shape[0] * TILE)


@torch.library.register_fake("spt_fast::int4_mm")
def _(x, q, scale, low, group):
    return x.new_empty(x.shape[0], q.shape[0] * TILE)


@torch.library.register_fake("spt_fast::dense_mm")
def _(x, w):
    return x.new_empty(x.shape[0], w.numel() // x.shape[1])


@torch.library.register_fake("spt_fast::dense_mm_rowmajor")
def _(x, w, trans):
    return x.new_empty(x.shape[0], w.shape[1] if trans else w.shape[0])


@torch.library.register_fake("spt_fast::quant_prefill")
def _(x, q, scale, low, group, bits):
    return x.new_empty(x.shape[0], q.shape[0] * TILE)


@torch.library.register_fake("spt_fast::causal_attention")
def _(q, k, v):
    return torch.empty_like(q)


@torch.library.register_fake("spt_fast::decode_attention")
def _(q, k, v, pos):
    return torch.empty_like(q)


def attention_applies(dtype: torch.dtype, n_heads: int, n_kv_heads: int, head_dim: int) -> bool:
    """Whether decode_attention serves a model of this shape in this dtype on the CPU: fp32 or bf16,
    whole K/V groups, head_dim a multiple of 16, and the kernels built."""
    return (dtype in (torch.float32, torch.bfloat16) and n_heads % n_kv_heads == 0 and head_dim % 16 == 0
            and library() is not None)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Attention of one query token per row: q [B, H, 1, D], K/V caches [B, Hkv, S, D], row b seeing
    slots 0..pos[b] (int64 [B]); [B, H, 1, D] in q's dtype (fp32 softmax and sums)."""
    return torch.ops.spt_fast.decode_attention(q, k, v, pos)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) for [rows, n] fp32 on the CPU (rows apart by any stride, elements contiguous),
    through spt_argmax_rows: the same indices (first maximum; first NaN), a few times faster
    for a vocabulary's logits. Anything else, or a traced call, goes to torch.argmax."""
    lib = library() if x.device.type == "cpu" else None
    if (lib is None or x.dim() != 2 or x.dtype != torch.float32 or x.stride(-1) != 1 or x.shape[-1] == 0
            or torch.compiler.is_compiling()):
        return x.argmax(-1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.spt_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(), torch.get_num_threads())
    return out


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [m, k] fp32 times the int8 tiles q [n / TILE, k, TILE] with scales [n] fp32: [m, n] fp32."""
    return torch.ops.spt_fast.int8_mm(x, q, scale)


def int4_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group: int) -> torch.Tensor:
    """x [m, k] fp32 times the int4 words q [n / TILE, k / 8, TILE] with per-group scale and low
    (bf16, [k / group, n] packed by pack_int4_groups): [m, n] fp32. With AVX-512 BF16 the activations are rounded to bf16
    (cpu_native.c says why), else they stay fp32."""
    return torch.ops.spt_fast.int4_mm(x, q, scale, low, group)


def dense_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [m, k] times a weight packed by pack_dense ([n, k] before), in the weight's dtype (fp32
    or bf16, as x): [m, n], summed in fp32."""
    return torch.ops.spt_fast.dense_mm(x, w)


def dense_mm_rowmajor(x: torch.Tensor, w: torch.Tensor, trans: bool = False) -> torch.Tensor:
    """x [m, k] times w^T for w [n, k] as stored, or (trans) times w for w [k, n]: [m, n] in w's
    dtype (fp32 or bf16, as x), summed in fp32; n a multiple of VEC, k of 8 (rowmajor_applies).
    For many rows: each call packs the weights a group at a time into scratch (no copy kept)."""
    return torch.ops.spt_fast.dense_mm_rowmajor(x, w, trans)


def rowmajor_serves(n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether dense_mm_rowmajor serves a product with n outputs and k inputs in this dtype here."""
    lib = library()
    need = {torch.float32: 1, torch.bfloat16: 2}.get(dtype)
    return lib is not None and need is not None and n % VEC == 0 and k % 8 == 0 and bool(lib.spt_dense_vector() & need)


def rowmajor_applies(x: torch.Tensor, w: torch.Tensor, trans: bool = False) -> bool:
    """Whether dense_mm_rowmajor serves rows x [..., k] against this weight on this CPU."""
    if w.dim() != 2 or x.dtype != w.dtype or x.device.type != "cpu" or w.device.type != "cpu":
        return False
    k, n = w.shape if trans else (w.shape[1], w.shape[0])
    return x.shape[-1] == k and rowmajor_serves(n, k, w.dtype)


def quant_prefill(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None, group: int,
                  bits: int) -> torch.Tensor:
    """Many rows x [m, k] (fp32 or bf16) times int8 (bits 8: q, scale as int8_mm takes them) or
    int4 (bits 4: as int4_mm) weights: [m, padded n] in x's dtype. Each tile is dequantized into
    scratch (in fp32, then rounded to x's dtype) and multiplied on the dense kernel: for a
    prefill, where the int kernels' few-row tiles would be slow. Fast where dense_vector_path(x.dtype)."""
    return torch.ops.spt_fast.quant_prefill(x, q, scale, low, group, bits)


def dense_vector_path(dtype: torch.dtype) -> bool:
    """Whether the built dense kernel has a vector path for this dtype (else it is scalar, slow)."""
    lib = library()
    need = {torch.float32: 1, torch.bfloat16: 2}.get(dtype)
    return lib is not None and need is not None and bool(lib.spt_dense_vector() & need)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of a prefill: q [B, H, T, D], k/v [B, Hkv, T, D] (H a multiple of
    Hkv), query t seeing keys 0..t; [B, H, T, D] in q's dtype (fp32 or bf16; fp32 sums and softmax).
    Applies where attention_applies does."""
    return torch.ops.spt_fast.causal_attention(q, k, v)
