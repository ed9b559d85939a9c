"""CPU projections of the generation engine (`Engine` on CPU; see README "Generation engine").

A decode step multiplies a few rows by every weight of the model, so it is bound by reading the
weights. `attach_cpu_projections` gives the engine's private Llama view `CPUProjection` modules
in place of its dense layers (q/k/v, o, gate/up, down, LM head). They run:

- one row inside a compiled step (batch-1 decode), unless the C kernel below won the one-row
  choice: each projection as a product summed over the input width. Inductor turns it into one
  loop that streams each weight row once, fused with the ops around it: 27-49 GB/s of weights
  where the BLAS matrix-vector call reached 14-26 GB/s on the 2-vCPU machine (`python
  bench/cpu_projections.py` prints the comparison).
- everything else (the prefill, batched decode, an eager engine), and one row where it won:
  one of three kernels, *measured* on this CPU, once per machine, dtype and model shape,
  separately for one row, a batched step (16 rows) and a prefill (128; `choose_kernels`, kept
  under the cache folder): oneDNN on weights packed once (q/k/v and gate/up as one matrix each,
  through a custom op that inductor leaves alone), the BLAS (F.linear) on the weights as they
  are, or this project's C kernel (cpu_native.dense_mm: blocks of 8 rows x 48 outputs in
  registers, bf16 through the AVX-512 BF16 dot instruction). On the AMD EPYC ours won all three
  (fp32 16 rows 176-223 GFLOPS against oneDNN's 145-212, bf16 339-426 against 234-366); what
  won on an AMD Zen CPU lost on an Intel Xeon before, so nothing is assumed.
- with weights="int8" / "int4": PyTorch's weight-only int8 / int4 CPU kernels (QuantProjection);
  with weights="w8a8": int8 weights and per-row int8 activations, an exact integer product
  (W8A8Projection).

The original weights are shared, not copied; packed copies are kept for the chosen kernels only
(one more copy of the dense weights per packed kernel chosen; none when the BLAS wins everywhere).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_HAS_ONEDNN = torch.backends.mkldnn.is_available()


@torch.library.custom_op("spt_fast::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    # An opaque op: inductor neither re-packs the oneDNN weight nor lowers the call itself.
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


@_onednn_linear.register_fake
def _(x, packed, out_features):
    return x.new_empty(x.shape[0], out_features)


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] (one row) @ weight [N, K]^T as a product and a sum (fp32 accumulation)."""
    return (x.unsqueeze(-2) * weight).sum(-1, dtype=torch.float32).to(x.dtype)


def _rows_key(rows: int) -> int:
    """Which measured choice serves `rows` input rows: 1 one row, 2 a batched decode step (2-32),
    3 a prefill."""
    return 1 if rows == 1 else 2 if rows <= 32 else 3


class CPUProjection(nn.Module):
    """One or more bias-free linear layers that read the same input (q/k/v, gate/up) on the CPU.

    Returns one tensor per layer (a tuple), or the tensor itself for a single layer. `kernels` maps
    _rows_key -> "onednn" / "blas" / "native" (cpu_native's dense_mm); `use` sets it and keeps the
    packed copies those kernels need, no others.
    """

    def __init__(self, layers, pack_rows: int = 16, kernels: dict | None = None):
        super().__init__()
        weights = [layer.weight.detach() for layer in layers]
        self.sizes = [w.shape[0] for w in weights]
        self.pack_rows = pack_rows
        for i, w in enumerate(weights):
            # Row-major (the input width contiguous) for the product-and-sum: a copy only for a
            # weight stored column-major (column_major_linears, by an engine without projections).
            self.register_buffer(f"w{i}", w.contiguous(), persistent=False)
        self.packed = self.native = None
        self.kernels = {}
        self.use(kernels or {1: "onednn", 2: "onednn", 3: "onednn"})

    def weights(self):
        return [getattr(self, f"w{i}") for i in range(len(self.sizes))]

    def _merged(self) -> torch.Tensor:
        weights = self.weights()
        return (torch.cat(weights) if len(weights) > 1 else weights[0]).contiguous()

    def native_applies(self) -> bool:
        from . import cpu_native

        return cpu_native.dense_applies(self.w0) and sum(self.sizes) % cpu_native.VEC == 0

    def use(self, kernels: dict) -> None:
        """Serve with these kernels (those this CPU lacks fall back to the BLAS); pack for them only."""
        kernels = {k: v if (v != "onednn" or _HAS_ONEDNN) and (v != "native" or self.native_applies()) else "blas"
                   for k, v in kernels.items()}
        self.kernels = kernels
        if "onednn" not in kernels.values():
            self.packed = None
        elif self.packed is None:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self._merged(), self.pack_rows)
        if "native" not in kernels.values():
            self.native = None
        elif self.native is None:
            from .cpu_native import pack_dense

            self.native = pack_dense(self._merged())

    def kernel_for(self, rows: int) -> str:
        """The kernel that serves this many input rows."""
        return self.kernels[_rows_key(rows)]

    def forward(self, x):
        rows = x.shape[:-1].numel()
        kernel = self.kernels[_rows_key(rows)]
        if rows == 1 and torch.compiler.is_compiling() and kernel != "native":
            outs = [gemv(x, w) for w in self.weights()]
        elif kernel == "native":
            y = torch.ops.spt_fast.dense_mm(x.reshape(rows, x.shape[-1]), self.native)
            outs = y.reshape(*x.shape[:-1], -1).split(self.sizes, dim=-1)
        elif kernel == "onednn":
            flat = x.reshape(rows, x.shape[-1])
            if torch.compiler.is_compiling():
                y = _onednn_linear(flat, self.packed, sum(self.sizes))
            else:  # eager: the custom op's Python dispatch costs ~30 us a call (~4 ms a decode step)
                y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, None, "none", [], "")
            outs = y.reshape(*x.shape[:-1], -1).split(self.sizes, dim=-1)
        else:
            outs = [F.linear(x, w) for w in self.weights()]
        return tuple(outs) if len(outs) > 1 else outs[0]


KERNELS = ("onednn", "blas", "native")


def best_time(fn, reps: int) -> float:
    """Fastest of `reps` timed calls of fn(), after one untimed call (oneDNN primitive creation,
    page faults)."""
    import time

    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _time_kernels(projections: list[CPUProjection], rows: int, reps: int = 3) -> dict[str, float]:
    """Seconds one pass over these projections takes with each kernel this CPU has, for `rows`
    input rows. Each kernel's packed copies are made for its turn only (one extra copy at a time)."""
    out = {}
    xs = [torch.randn(rows, p.weights()[0].shape[1], dtype=p.weights()[0].dtype) for p in projections]
    for kernel in KERNELS:
        if (kernel == "onednn" and not _HAS_ONEDNN) or (kernel == "native" and
                                                        not all(p.native_applies() for p in projections)):
            continue
        for p in projections:
            p.use({1: kernel, 2: kernel, 3: kernel})
        out[kernel] = best_time(lambda: [p(x) for p, x in zip(projections, xs)], reps)
    return out


def choose_kernels(projections: list[CPUProjection], cache_file=None) -> dict[int, str]:
    """The fastest kernel for one row, for a batched step (16 rows) and for a prefill (128 rows),
    measured on a pass over all of these projections on this CPU, as a decode step makes it; kept
    in `cache_file` (JSON) per CPU model, torch version, threads, dtype and shapes, so each machine
    measures once.

    All of them, not one of each shape: a step streams every weight from memory, and one layer's
    weights stay in the last-level cache between repeats. Timed on one layer of each shape, oneDNN
    won one row on the Intel Xeon (4.4 vs 4.2-4.5 ms, within noise); over the whole model the BLAS
    was faster there (21.9 vs 26.9 ms), as in transformers' own decode step."""
    from . import cpu_native

    distinct = {}
    for p in projections:  # the shapes name the model in the cache key (all of them are timed)
        distinct.setdefault((tuple(p.weights()[0].shape), len(p.sizes), str(p.weights()[0].dtype)), p)
    native = "native" if cpu_native.library() is not None else "no-native"
    key = choice_key(f"whole-model-3|{native}", ";".join(f"{s}x{n}:{d}" for s, n, d in sorted(distinct)))

    def measure():
        chosen = {}
        with torch.no_grad():
            for rows in (1, 16, 128):
                times = _time_kernels(projections, rows)
                chosen[str(_rows_key(rows))] = min(times, key=times.get)
        return chosen

    return {int(k): v for k, v in cached_choice(cache_file, key, measure).items()}


def cached_choice(cache_file, key: str, measure):
    """table[key] from the JSON cache file, or measure() stored there (atomically) first."""
    import json
    import os

    table = {}
    if cache_file is not None and os.path.isfile(cache_file):
        try:
            with open(cache_file) as f:
                table = json.load(f)
        except (OSError, ValueError):
            table = {}
    if key not in table:
        table[key] = measure()
        if cache_file is not None:
            from ..utils import write_text_atomic

            try:
                os.makedirs(os.path.dirname(cache_file), exist_ok=True)
                write_text_atomic(cache_file, json.dumps(table, indent=1))
            except OSError:
                pass  # a read-only cache folder: measure again next time
    return table[key]


def choice_key(kind: str, *parts: str) -> str:
    """A cached choice's key: what is chosen, this machine (CPU model, torch, threads), then `parts`."""
    from ..utils import cpu_info

    return "|".join([kind, cpu_info()["model"], torch.__version__, f"threads={torch.get_num_threads()}", *parts])


def _fastest(candidates: dict, *args) -> str:
    """The name of the candidate function that runs four calls on `args` fastest (best of 5)."""
    with torch.no_grad():
        times = {name: best_time(lambda fn=fn: [fn(*args) for _ in range(4)], 5) for name, fn in candidates.items()}
    return min(times, key=times.get)


def _heads(config) -> str:
    return f"{config.n_heads}/{config.n_kv_heads}x{config.head_dim}"


def choose_decode_attention(config, dtype: torch.dtype, cache_file=None) -> str:
    """"sdpa", "bmm" or "native": the fastest attention for a decode step of 16 rows (one query
    each, 512 cached positions) on this CPU in this dtype, measured once per machine and kept in
    `cache_file`. PyTorch's fused SDPA with a mask and grouped K/V took 5.7 ms a call in bf16 on
    the AMD EPYC (Zen 5, no AMX) against 1.0 ms for two batched matmuls (fp32: 0.79 vs 0.76):
    30 layers of it were most of an eager bf16 batch-16 step. "native" is cpu_native's C kernel
    (where it was built), which then serves every one-token step, compiled ones included."""
    from . import cpu_native

    q_shape = (16, config.n_heads, 1, config.head_dim)
    native = cpu_native.attention_applies(dtype, config.n_heads, config.n_kv_heads, config.head_dim)
    key = choice_key("decode-attention", str(dtype), _heads(config), *(["with-native"] if native else []))

    def measure():
        from .llama import bmm_attention, masked_sdpa

        g = torch.Generator().manual_seed(0)
        b, s = 16, 512
        q = torch.randn(*q_shape, generator=g).to(dtype)
        k, v = (torch.randn(b, config.n_kv_heads, s, config.head_dim, generator=g).to(dtype) for _ in range(2))
        last = torch.randint(s // 2, s, (b,), generator=g)
        keep = torch.arange(s)[None, None, None, :] <= last[:, None, None, None]
        mask = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))
        candidates = {"sdpa": masked_sdpa, "bmm": bmm_attention}
        if native:
            candidates["native"] = lambda q, k, v, mask: cpu_native.decode_attention(q, k, v, last)
        return _fastest(candidates, q, k, v, mask)

    return cached_choice(cache_file, key, measure)


def choose_prefill_attention(config, dtype: torch.dtype, cache_file=None) -> str:
    """"sdpa" or "native": the faster causal attention for a prefill of 128 tokens (one row) on
    this CPU in this dtype, PyTorch's fused SDPA (flash) or cpu_native's C kernel, measured once
    per machine and kept in `cache_file`. On the AMD EPYC the C kernel took 0.19 ms a layer of
    the embedded model's 136-token prefill in bf16 against 0.57 for SDPA."""
    from . import cpu_native

    if not cpu_native.attention_applies(dtype, config.n_heads, config.n_kv_heads, config.head_dim):
        return "sdpa"
    key = choice_key("prefill-attention", str(dtype), _heads(config))

    def measure():
        from .llama import causal_sdpa

        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, config.n_heads, 128, config.head_dim, generator=g).to(dtype)
        k, v = (torch.randn(1, config.n_kv_heads, 128, config.head_dim, generator=g).to(dtype) for _ in range(2))
        return _fastest({"sdpa": causal_sdpa, "native": cpu_native.causal_attention}, q, k, v)

    return cached_choice(cache_file, key, measure)


class QuantProjection(nn.Module):
    """One or more bias-free linear layers with weight-only int8 or int4 weights.

    int8: one scale per output row; int4: groups of `group` input columns with a scale and an
    offset each (w = q * scale + low). A few rows (decode) go through this project's kernels
    (spt_fast/model/cpu_native.c: int8 widened to fp32 in registers, fp32 activations; int4 as bf16
    pairs for AVX-512 BF16 dot products) where they were built, unless PyTorch's own,
    aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu (bf16 activations; int4 in tinygemm's
    format, w = (q - 8) * scale + zero), measured clearly faster (choose_quant_kernels: on the AMD
    EPYC they read int8 weights at 10-13 GB/s against 20-27 for ours, and tied on int4). Reading a
    quarter (int8) or an eighth (int4) of the fp32 bytes is what a decode step is bound by. Many rows (a prefill) are compute-bound and those kernels are slow
    there, so the weights are dequantised into the activations' dtype for one dense matmul (with
    PyTorch's int4 kernels this reads a second 4-bit copy in plain nibble order: their layout is
    private to them).
    """

    KERNEL_ROWS = 32  # at most this many rows (a decode batch) through the int kernels; more: dense

    def __init__(self, layers, bits: int, dtype: torch.dtype, group: int = 32, native: bool = True):
        super().__init__()
        from . import cpu_native

        weights = [layer.weight.detach().float() for layer in layers]
        self.sizes, self.bits, self.dtype, self.group = [w.shape[0] for w in weights], bits, dtype, group
        w = torch.cat(weights) if len(weights) > 1 else weights[0]
        n, k = w.shape
        if bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        if bits == 4 and k % group:
            raise ValueError(f"int4 needs the input width {k} divisible by the group size {group}")
        # native=False: PyTorch's kernels even where ours are built (choose_quant_kernels measures both)
        self.native = native and k % 8 == 0 and group % 8 == 0 and cpu_native.library() is not None
        # Many rows (a prefill) through cpu_native.quant_prefill, tile by tile, where it has the
        # dense kernel's vector path for this dtype; else through a dequantized dense copy.
        self.prefill_native = self.native and cpu_native.dense_vector_path(dtype)
        # Zero rows up to the kernels' output tile (ours: 32; PyTorch's int4: 16), cut off after.
        pad = -n % (cpu_native.TILE if self.native else 16 if bits == 4 else 1)
        w = torch.cat([w, w.new_zeros(pad, k)]) if pad else w
        n = w.shape[0]
        if bits == 8:
            scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
            q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
            if self.native:
                self.register_buffer("q", cpu_native.pack_int8(q), persistent=False)
                self.register_buffer("scale", scale, persistent=False)
            else:
                self.register_buffer("q", q, persistent=False)
                self.register_buffer("scale", scale.to(torch.bfloat16), persistent=False)  # the kernel's
                self.register_buffer("row_scale", scale.to(dtype), persistent=False)  # the dense path's
            return
        g = w.reshape(n, k // group, group)
        low, high = g.amin(-1), g.amax(-1)
        # Scales and offsets as bf16 values (our kernels read them so: fp32 ones were a third of an
        # int4 step's bytes), rounded before the weights are, which then fit what is stored.
        scale = ((high - low) / 15).clamp_min(1e-12).bfloat16().float()
        low = low.bfloat16().float()
        q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
        if self.native:
            self.register_buffer("q", cpu_native.pack_int4(q), persistent=False)
            self.register_buffer("scale", cpu_native.pack_int4_groups(scale.t().bfloat16()), persistent=False)
            self.register_buffer("low", cpu_native.pack_int4_groups(low.t().bfloat16()), persistent=False)
        else:
            self.register_buffer("q", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
            zero = low + 8 * scale
            self.register_buffer("scale", torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous(),
                                 persistent=False)
        if self.prefill_native:
            return
        # Else a prefill's dense copy comes from plain nibbles: unpacking the kernels' words took
        # ~1 s a prefill of the embedded model (int32 intermediates eight times the weights' size).
        nibbles = q.to(torch.uint8).reshape(n, k // 2, 2)
        self.register_buffer("plain", nibbles[..., 0] | (nibbles[..., 1] << 4), persistent=False)
        self.register_buffer("group_scale", scale.to(dtype), persistent=False)  # [n, k / group]
        self.register_buffer("group_low", low.to(dtype), persistent=False)

    def read_bytes(self) -> int:
        """Bytes a decode step reads: the integer weights and their scales (and offsets)."""
        parts = [self.q, self.scale] + ([self.low] if self.native and self.bits == 4 else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weights [n, k] the kernels multiply by, in `dtype` (with the padding rows)."""
        from . import cpu_native

        if self.bits == 8:
            if self.native:
                return cpu_native.unpack_int8(self.q).to(dtype) * self.scale.to(dtype)[:, None]
            return self.q.to(dtype) * self.row_scale.to(dtype)[:, None]
        if self.prefill_native:  # no plain copy kept: from the kernels' words (slow; not on a hot path)
            q = cpu_native.unpack_int4(self.q)
            scale, low = (t.transpose(0, 1).reshape(t.shape[1], -1).t() for t in (self.scale, self.low))
        else:
            n, half = self.plain.shape
            q = torch.stack([self.plain & 0xF, self.plain >> 4], -1).reshape(n, 2 * half)
            scale, low = self.group_scale, self.group_low
        n, k = q.shape
        q = q.reshape(n, -1, self.group).to(dtype)
        return (q * scale[..., None].to(dtype) + low[..., None].to(dtype)).reshape(n, k)

    def kernel_input(self, flat: torch.Tensor) -> torch.Tensor:
        """Rows [m, k] in the dtype the int kernel takes: fp32 (ours), bf16 (PyTorch's)."""
        return flat.float() if self.native else flat.to(torch.bfloat16)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The int kernel alone on kernel_input rows: [m, padded n]."""
        if self.native and self.bits == 8:
            return torch.ops.spt_fast.int8_mm(x, self.q, self.scale)
        if self.native:
            return torch.ops.spt_fast.int4_mm(x, self.q, self.scale, self.low, self.group)
        if self.bits == 8:
            return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.q, self.group, self.scale)

    def forward(self, x):
        rows = x.shape[:-1].numel()
        flat = x.reshape(rows, x.shape[-1])
        width = sum(self.sizes)
        if rows > self.KERNEL_ROWS and self.prefill_native and x.dtype == self.dtype:
            y = torch.ops.spt_fast.quant_prefill(flat, self.q, self.scale, self.low if self.bits == 4 else None,
                                                 self.group, self.bits)[:, :width]
        elif rows > self.KERNEL_ROWS:
            y = F.linear(flat, self.dequantized(x.dtype)[:width])
        else:
            y = self.kernel(self.kernel_input(flat))[:, :width]
        outs = y.to(x.dtype).reshape(*x.shape[:-1], -1).split(self.sizes, dim=-1)
        return tuple(outs) if len(outs) > 1 else outs[0]


class W8A8Projection(nn.Module):
    """One or more bias-free linear layers with int8 weights *and* int8 activations (W8A8).

    The weights: one symmetric scale per output row. The activations: quantized per row on the
    fly, one symmetric scale per row. The product is an integer matrix product (torch._int_mm,
    int32 accumulation, oneDNN's VNNI kernels on x86), so the projection is exact: a row's result
    never depends on the other rows of its batch or on how the kernel blocks the work. (The rest of
    a step is not: attention's last bits depend on the batch's shape, and rounding activations to
    int8 turns such differences into different integers far more often than fp32 turns them into
    different tokens — through the server 30 of 128 greedy replies differed from the offline
    engine's, none in fp32.) It reads a quarter of the fp32 bytes and, unlike the weight-only int8
    path (bf16 activations), needs no native bf16: on the Intel Xeon without AVX-512 BF16, a pass
    over all the embedded model's projections took 9.3 ms for one row and 21 ms for 16 (fp32: 22
    and 42 ms). Quantizing the activations costs accuracy: replies differ from fp32 more often than
    with weight-only int8 (tests/test_cpu_decode.py states both).
    """

    def __init__(self, layers):
        super().__init__()
        weights = [layer.weight.detach().float() for layer in layers]
        self.sizes = [w.shape[0] for w in weights]
        w = torch.cat(weights) if len(weights) > 1 else weights[0]
        scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
        if w.shape[1] % 8:
            raise ValueError(f"w8a8 needs the input width ({w.shape[1]}) to be a multiple of 8")
        # Row-major [n, k], multiplied as its transposed view (column-major [k, n]): the kernel's fast
        # layout here (9.3 ms a pass, 15.4 with a contiguous [k, n]).
        self.register_buffer("q", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), persistent=False)
        self.register_buffer("scale", scale / 127, persistent=False)  # with the activations' 1/127

    def read_bytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def forward(self, x):
        rows = x.shape[:-1].numel()
        flat = x.reshape(rows, x.shape[-1]).float()
        # Per-row scale max|x| / 127 (an all-zero row stays zero: its values times any scale).
        top = torch.linalg.vector_norm(flat, float("inf"), dim=1, keepdim=True).clamp_min_(1e-30)
        xq = (flat * (127.0 / top)).round_().to(torch.int8)
        y = torch._int_mm(xq, self.q.t()) * (top * self.scale)
        outs = y.to(x.dtype).reshape(*x.shape[:-1], -1).split(self.sizes, dim=-1)
        return tuple(outs) if len(outs) > 1 else outs[0]


def choose_quant_kernels(config, bits: int, dtype: torch.dtype, cache_file=None) -> bool:
    """Whether this project's int kernels (cpu_native) beat PyTorch's for a one-row decode pass
    over the model's projection shapes with `bits`-bit weights, on this CPU in this dtype: measured
    once per machine (random weights of every layer, up to ~128M weights, so that they stream from
    memory as a step's do) and kept in `cache_file`. Only where ours were built. Measured on the AMD
    EPYC: int8 4.2-4.4 ms a pass (ours) against 7.8 (PyTorch's), int4 4.5 against 4.2."""
    from . import cpu_native

    if cpu_native.library() is None:
        return False
    key = choice_key(f"int{bits}-kernels", str(dtype),
                      f"{config.dim}x{config.intermediate_size}/{config.n_heads}/{config.n_kv_heads}")

    def measure():
        g = torch.Generator().manual_seed(0)
        d, kv, hidden = config.dim, config.n_kv_heads * config.head_dim, config.intermediate_size
        shapes = [(d + 2 * kv, d), (d, d), (2 * hidden, d), (d, hidden)]
        per_layer = sum(n * k for n, k in shapes)
        layers = max(1, min(config.n_layers, (128 << 20) // per_layer))
        rows = [torch.randn(1, k, generator=g).to(dtype) for _ in range(layers) for n, k in shapes]
        times = {}
        for native in (True, False):
            seed = torch.Generator().manual_seed(1)  # the same weights both ways, made one at a time
            projections = [QuantProjection([_Weight(torch.randn(n, k, generator=seed) * 0.02)], bits, dtype,
                                           native=native) for _ in range(layers) for n, k in shapes]
            # The kernels alone, as a compiled step calls them (the conversions around them fuse
            # into its neighbouring loops there).
            inputs = [p.kernel_input(x) for p, x in zip(projections, rows)]
            with torch.no_grad():
                times[native] = best_time(lambda ps=projections, xs=inputs: [p.kernel(x) for p, x in zip(ps, xs)], 3)
            del projections
        # Ours unless PyTorch's is clearly faster: timed alone, the int4 kernels tied here (4.5 vs
        # 4.2 ms a pass) while in the compiled step ours was the faster (6.4-6.9 vs 7.5-8.4 ms).
        return "native" if times[True] <= 1.15 * times[False] else "torch"

    return cached_choice(cache_file, key, measure) == "native"


class _Weight:
    """What QuantProjection reads of a layer: its weight (random ones for a measurement)."""

    def __init__(self, weight):
        self.weight = weight


def _plain(layer) -> bool:
    return (type(layer) is nn.Linear and layer.bias is None and layer.weight.device.type == "cpu"
            and layer.weight.dtype in (torch.float32, torch.bfloat16))


WEIGHTS = ("int8", "int4", "w8a8")


def attach_cpu_projections(llama, weights: str | None = None, kernel_cache=None) -> bool:
    """Swap the dense layers of a compact Llama *view* (its own Attention/FeedForward objects;
    the HF model behind it keeps its layers) for CPUProjection modules, or QuantProjection ones
    with weights="int8" / "int4" (the LM head included; the input embedding is read one row per
    token and stays as it is). Returns False, changing nothing, unless every layer is a plain
    bias-free fp32/bf16 nn.Linear on the CPU."""
    from .fused_decode import FusedDecode, fused_decode_enabled  # (it imports this module's classes)

    plans = []
    for block in llama.layers:
        a, f = block.attention, block.feed_forward
        groups = [[a.wq, a.wk, a.wv], [a.wo], [f.w1, f.w3], [f.w2]]
        if not all(_plain(m) for g in groups for m in g):
            return False
        plans.append(groups)
    if not _plain(llama.output):
        return False
    # The LM head picks every token: with int4 blocks it stays int8 (as llama.cpp's 4-bit formats
    # keep their output matrix at higher precision), a small cost for much closer replies.
    dtype = llama.output.weight.dtype
    if weights is None:
        def make(layers):  # nothing packed before the choice (choose_kernels packs what it times)
            return CPUProjection(layers, kernels={1: "blas", 2: "blas", 3: "blas"})
        make_head = make
    elif weights == "w8a8":
        make = make_head = W8A8Projection
    elif weights in WEIGHTS:
        bits = 8 if weights == "int8" else 4
        # Where the whole-step C call will run, it needs our int kernels; they tie with PyTorch's
        # per call, and without the per-call costs the step is 1.6-2x faster (README).
        fused = choose_decode_attention(llama.config, dtype, kernel_cache) == "native" and fused_decode_enabled()
        native = fused or choose_quant_kernels(llama.config, bits, dtype, kernel_cache)
        head_native = native if bits == 8 or fused else choose_quant_kernels(llama.config, 8, dtype, kernel_cache)

        def make(layers):
            return QuantProjection(layers, bits, dtype, native=native)

        def make_head(layers):
            return QuantProjection(layers, 8, dtype, native=head_native)
    else:
        raise ValueError(f"weights must be one of {WEIGHTS} or None, got {weights!r}")
    for block, (qkv, o, gate_up, down) in zip(llama.layers, plans):
        block.attention.fused_qkv, block.attention.wo = make(qkv), make(o)
        block.feed_forward.fused_gate_up, block.feed_forward.w2 = make(gate_up), make(down)
    llama.output = make_head([llama.output])
    from .llama import bmm_attention, masked_sdpa

    choice = choose_decode_attention(llama.config, dtype, kernel_cache)
    llama.decode_attention = bmm_attention if choice == "bmm" else masked_sdpa
    llama.native_attention = choice == "native"
    llama.native_prefill_attention = choose_prefill_attention(llama.config, dtype, kernel_cache) == "native"
    if weights is None:
        dense = [m for m in llama.modules() if isinstance(m, CPUProjection)]
        kernels = choose_kernels(dense, kernel_cache)
        for m in dense:
            m.use(kernels)  # packed copies for the chosen kernels only
    _into_huge_pages(llama)
    llama.fused_decode = FusedDecode.attach(llama)  # after the move: it keeps the weights' addresses
    return True


def _into_huge_pages(llama) -> None:
    """Move every packed weight the C kernels stream into one region of huge pages
    (cpu_native.in_huge_pages: the kernels alone, one row through the embedded model's bf16
    projections, 20% faster; inside a whole decode step the difference was within this VM's noise)."""
    from . import cpu_native

    slots = []
    for m in llama.modules():
        if isinstance(m, CPUProjection) and m.native is not None:
            slots.append((m, "native"))
        elif isinstance(m, QuantProjection) and m.native:
            slots += [(m, name) for name in ("q", "scale", "low") if hasattr(m, name)]
    if slots:
        moved = cpu_native.in_huge_pages([getattr(m, name) for m, name in slots])
        for (m, name), t in zip(slots, moved):
            setattr(m, name, t)
