"""Projections for a compiled CPU decode step (`Engine(compile=True)` on CPU).

A decode step multiplies a few rows by every weight of the model, so it is bound by reading the
weights. `attach_cpu_projections` gives the engine's private Llama view `CPUProjection` modules
in place of its dense layers (q/k/v, o, gate/up, down, LM head); inside the compiled step they do:

- one row (batch 1): each projection is a product summed over the input width. Inductor turns it
  into one loop that streams each weight row once, fused with the ops around it: close to the
  memory bandwidth, where the BLAS / oneDNN matrix-vector calls reached 50-75% of it on the
  2-vCPU machines (bench/cpu_projections.py prints the comparison).
- more rows (batched decode), fp32: the weights are packed once for oneDNN and called through a
  custom op, q/k/v and gate/up as one matrix each. Inductor packs fp32 linears for MKL, which ran
  at a third of oneDNN's speed at 16 rows on an AMD Zen CPU. bf16: inductor's own packing (oneDNN)
  is kept.
Outside a compiled step (the prefill) they are plain `F.linear` on the original weights.

The original weights are shared, not copied; the fp32 packed copies cost one more copy of the
fp32 weights, as inductor's own frozen copies do.
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


class CPUProjection(nn.Module):
    """One or more bias-free linear layers that read the same input, for a compiled CPU step.

    Returns one tensor per layer (a tuple), or the tensor itself for a single layer.
    """

    def __init__(self, layers, pack_rows: int = 16):
        super().__init__()
        weights = [layer.weight.detach() for layer in layers]
        self.sizes = [w.shape[0] for w in weights]
        for i, w in enumerate(weights):
            # Row-major (the input width contiguous) for the product-and-sum; a copy only if a
            # previous eager engine left this weight column-major.
            self.register_buffer(f"w{i}", w.contiguous(), persistent=False)
        self.one_row_gemv = True  # False: one row goes through oneDNN too (bench/cpu_projections.py)
        self.packed = None
        if _HAS_ONEDNN:
            merged = torch.cat(weights) if len(weights) > 1 else weights[0]
            self.packed = torch.ops.mkldnn._reorder_linear_weight(merged.contiguous(), pack_rows)

    def weights(self):
        return [getattr(self, f"w{i}") for i in range(len(self.sizes))]

    def forward(self, x):
        rows = x.shape[:-1].numel()
        if rows == 1 and torch.compiler.is_compiling() and self.one_row_gemv:
            outs = [gemv(x, w) for w in self.weights()]
        elif self.packed is not None:
            y = _onednn_linear(x.reshape(rows, x.shape[-1]), self.packed, sum(self.sizes))
            outs = y.reshape(*x.shape[:-1], -1).split(self.sizes, dim=-1)
        else:
            outs = [F.linear(x, w) for w in self.weights()]
        return tuple(outs) if len(outs) > 1 else outs[0]


def _plain(layer) -> bool:
    return (type(layer) is nn.Linear and layer.bias is None and layer.weight.device.type == "cpu"
            and layer.weight.dtype in (torch.float32, torch.bfloat16))


def attach_cpu_projections(llama) -> bool:
    """Swap the dense layers of a compact Llama *view* (its own Attention/FeedForward objects;
    the HF model behind it keeps its layers) for CPUProjection modules. Returns False, changing
    nothing, unless every layer is a plain bias-free fp32/bf16 nn.Linear on the CPU."""
    plans = []
    for block in llama.layers:
        a, f = block.attention, block.feed_forward
        groups = [[a.wq, a.wk, a.wv], [a.wo], [f.w1, f.w3], [f.w2]]
        if not all(_plain(m) for g in groups for m in g):
            return False
        plans.append(groups)
    if not _plain(llama.output):
        return False
    for block, (qkv, o, gate_up, down) in zip(llama.layers, plans):
        block.attention.fused_qkv, block.attention.wo = CPUProjection(qkv), CPUProjection(o)
        block.feed_forward.fused_gate_up, block.feed_forward.w2 = CPUProjection(gate_up), CPUProjection(down)
    llama.output = CPUProjection([llama.output])
    return True
