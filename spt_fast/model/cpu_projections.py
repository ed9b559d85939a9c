"""CPU projections of the generation engine (`Engine` on CPU; see README "Generation engine").

A decode step multiplies a few rows by every weight of the model, so it is bound by reading the
weights. `attach_cpu_projections` gives the engine's private Llama view `CPUProjection` modules
in place of its dense layers (q/k/v, o, gate/up, down, LM head). They run:

- one row inside a compiled step (batch-1 decode): each projection as a product summed over the
  input width. Inductor turns it into one loop that streams each weight row once, fused with the
  ops around it: 27-49 GB/s of weights where the BLAS matrix-vector call reached 14-26 GB/s on the
  2-vCPU machine (`python bench/cpu_projections.py` prints the comparison).
- everything else (the prefill, batched decode, an eager engine): oneDNN on weights packed once,
  q/k/v and gate/up as one matrix each, through a custom op that inductor leaves alone. Inductor
  would pack fp32 linears for MKL, a third of oneDNN's speed at 16 rows on an AMD Zen CPU.

The original weights are shared, not copied; the packed copies cost one more copy of the dense
weights.
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
    """One or more bias-free linear layers that read the same input (q/k/v, gate/up) on the CPU.

    Returns one tensor per layer (a tuple), or the tensor itself for a single layer.
    """

    def __init__(self, layers, pack_rows: int = 16):
        super().__init__()
        weights = [layer.weight.detach() for layer in layers]
        self.sizes = [w.shape[0] for w in weights]
        for i, w in enumerate(weights):
            # Row-major (the input width contiguous) for the product-and-sum: a copy only for a
            # weight stored column-major (column_major_linears, by an engine without projections).
            self.register_buffer(f"w{i}", w.contiguous(), persistent=False)
        self.packed = None
        if _HAS_ONEDNN:
            merged = torch.cat(weights) if len(weights) > 1 else weights[0]
            self.packed = torch.ops.mkldnn._reorder_linear_weight(merged.contiguous(), pack_rows)

    def weights(self):
        return [getattr(self, f"w{i}") for i in range(len(self.sizes))]

    def forward(self, x):
        rows = x.shape[:-1].numel()
        if rows == 1 and torch.compiler.is_compiling():
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
