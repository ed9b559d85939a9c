"""A training step's frozen linear layers on the CPU through cpu_native's C product.

The shared layout's step is mostly products of activations with the frozen base weights: the
context pass (no autograd) and the branches, forward and backward (only dx = dy W: the weights
take no gradient). cpu_native's dense kernel ran them faster than PyTorch's fp32 BLAS on the AMD
EPYC (900 rows: 93-104 against 78-96 GMAC/s; the context pass 1.23x faster in a profile), on
the weights as stored: each call packs them a group at a time into scratch, so no copy is kept.
`native_linears()` routes F.linear there inside its block, where the measurement
(choose_training_linears, kept per machine) found it faster; else it changes nothing.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from . import cpu_native

# Fewer rows than this stay with PyTorch (the per-call packing would not pay for itself).
MIN_ROWS = 64


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T with W frozen: the backward gives dx = dy W only."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        y = cpu_native.dense_mm_rowmajor(x.reshape(-1, x.shape[-1]), w)
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    @once_differentiable  # dx is not itself differentiable here: a double backward raises
    def backward(ctx, dy):
        (w,) = ctx.saved_tensors
        dx = cpu_native.dense_mm_rowmajor(dy.reshape(-1, dy.shape[-1]), w, trans=True)
        return dx.reshape(*dy.shape[:-1], w.shape[1]), None


def applies(x: torch.Tensor, w: torch.Tensor, bias) -> bool:
    """Whether F.linear(x, w, bias) goes to the C product: no bias, a frozen weight, enough rows,
    shapes and dtype the kernel takes (the backward's too, when x takes a gradient)."""
    if bias is not None or w.requires_grad or x.dim() < 2 or x.shape[:-1].numel() < MIN_ROWS:
        return False
    if not cpu_native.rowmajor_applies(x, w):
        return False
    return not x.requires_grad or cpu_native.rowmajor_serves(w.shape[1], w.shape[0], w.dtype)  # dx = dy W


class _NativeLinears(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if applies(args[0], args[1], bias):
                return _FrozenLinear.apply(args[0], args[1])
        return func(*args, **kwargs)


def native_linears(on: bool = True):
    """A context in which F.linear calls that `applies` accepts run on the C product. A forward
    recomputed in the backward (activation checkpointing) must run in the same context, or its
    saved tensors differ from the first forward's: torch.utils.checkpoint's context_fn takes
    `recompute_contexts(on)`."""
    return _NativeLinears() if on and not torch.compiler.is_compiling() else contextlib.nullcontext()


def recompute_contexts(on: bool):
    """context_fn for torch.utils.checkpoint (use_reentrant=False): the forward already runs in
    native_linears(on); its recomputation in the backward gets the same."""
    return contextlib.nullcontext(), native_linears(on)


def choose_training_linears(shapes, dtype: torch.dtype, cache_file=None) -> bool:
    """Whether the C product beats F.linear for a training step's products on this CPU: a pass of
    512 rows over every [n, k] weight shape given, forward (x W^T) and backward (dy W), measured
    once per machine and kept in `cache_file`."""
    from .cpu_projections import best_time, choice_key, cached_choice

    shapes = sorted({tuple(s) for s in shapes})
    if not shapes or not all(cpu_native.rowmajor_serves(n, k, dtype) and cpu_native.rowmajor_serves(k, n, dtype)
                             for n, k in shapes):  # forward and backward products
        return False
    key = choice_key("training-linears", str(dtype), ";".join(f"{n}x{k}" for n, k in shapes))

    def measure():
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(n, k, generator=g).to(dtype) for n, k in shapes]
        xs = [torch.randn(512, k, generator=g).to(dtype) for _, k in shapes]
        dys = [torch.randn(512, n, generator=g).to(dtype) for n, _ in shapes]

        def torch_pass():
            for w, x, dy in zip(ws, xs, dys):
                F.linear(x, w)
                dy @ w

        def native_pass():
            for w, x, dy in zip(ws, xs, dys):
                cpu_native.dense_mm_rowmajor(x, w)
                cpu_native.dense_mm_rowmajor(dy, w, trans=True)

        with torch.no_grad():
            times = {"torch": best_time(torch_pass, 3), "native": best_time(native_pass, 3)}
        return min(times, key=times.get)

    return cached_choice(cache_file, key, measure) == "native"
