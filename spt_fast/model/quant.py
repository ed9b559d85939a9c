"""4-bit NF4 base weights through bitsandbytes, safe for soft-prompt gradients.

The base model is frozen, but SPT needs exact gradients w.r.t. `inputs_embeds`, so every 4-bit
layer must stay on bitsandbytes' autograd path (`MatMul4Bit`, whose backward multiplies by the
dequantised weight). `guard_4bit` keeps bitsandbytes' CPU inference repack from taking a layer
off that path; see its docstring for the mechanism.
"""
import copy
import logging
import sys

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _bnb():
    # Imported lazily: bitsandbytes loads native libraries and probes devices at import time, and
    # a bf16-only run should not pay for (or fail on) that.
    try:
        import bitsandbytes
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a declared dependency
        raise ImportError("4-bit base weights need bitsandbytes: pip install bitsandbytes") from exc
    return bitsandbytes


def _linear4bit_class():
    return _bnb().nn.Linear4bit


def _iter_linear4bit(model: nn.Module):
    cls = _linear4bit_class()
    return [m for m in model.modules() if isinstance(m, cls)]


def to_nf4(linear: nn.Linear, compute_dtype, blocksize: int) -> nn.Module:
    bnb = _bnb()
    device = linear.weight.device
    # Built on "meta" so no throwaway full-precision weight is allocated; the real tensors are
    # attached just below.
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta",
    )
    weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, blocksize=blocksize, compress_statistics=True,
        quant_type="nf4", module=layer,
    )
    # `_quantize` is what Params4bit.to(device) runs on a not-yet-quantized weight; calling it
    # directly quantizes on the weight's current device, CPU included.
    layer.weight = weight._quantize(device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    layer.train(linear.training)
    return layer


def quantize_linear_layers(model: nn.Module, compute_dtype=torch.bfloat16, blocksize: int = 64,
                           skip: tuple[str, ...] = ("lm_head", "output")) -> nn.Module:
    """Replace every plain nn.Linear in `model` with a frozen NF4 Linear4bit (double quant), in place.

    Modules whose dotted name ends with an entry of `skip` stay in full precision: the LM head is
    applied only at response positions and its logits must be exact (and on tied-embedding models
    such as OPT, quantizing it would also break the tie with the input embedding).
    Only modules whose type is exactly nn.Linear are replaced: subclasses may read `.weight`
    directly instead of calling forward (e.g. nn.MultiheadAttention's out_proj).
    Compute dtype: bf16 is the GPU setting; on CPU both float32 and bfloat16 work with
    bitsandbytes 0.50 (the CPU backend dequantizes into the compute dtype and uses torch matmul).
    """
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize}")
    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not full.endswith(tuple(skip)):
                targets.append((module, child_name))
    # Collected first, replaced after: mutating children while named_modules() walks them is unsafe.
    for parent, child_name in targets:
        setattr(parent, child_name, to_nf4(getattr(parent, child_name), compute_dtype, blocksize))
    guard_4bit(model)
    return model


def is_quantized(model: nn.Module) -> bool:
    """True if any layer of `model` holds 4-bit bitsandbytes weights."""
    if "bitsandbytes" not in sys.modules:
        # Nothing can hold its layers before it is imported; importing it only to ask costs ~1.5 s
        # of a CLI's start (it loads native libraries and compiles its CPU ops).
        return False
    try:
        return len(_iter_linear4bit(model)) > 0
    except ImportError:
        return False


def _dequantized_weight(layer) -> torch.Tensor:
    bnb = _bnb()
    w = layer.weight
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32)


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with each Linear4bit turned back into an fp32 nn.Linear.

    The copy computes exactly what the 4-bit model's fp32 path computes (same NF4-rounded weights),
    so it is the reference for gradient and logit tests. The original model is not touched.
    """
    ref = copy.deepcopy(model)
    # The copy may carry CPU-repacked weights (see guard_4bit); put them back in the standard
    # layout before dequantizing, otherwise dequantize_4bit would read the packed nibbles wrongly.
    guard_4bit(ref)
    cls = _linear4bit_class()
    targets = []
    for module in ref.modules():
        for child_name, child in module.named_children():
            if isinstance(child, cls):
                targets.append((module, child_name, child))
    for parent, child_name, layer in targets:
        weight = _dequantized_weight(layer)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=weight.device, dtype=torch.float32)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.data.to(torch.float32), requires_grad=False)
        linear.train(layer.training)
        setattr(parent, child_name, linear)
    return ref


def _undo_cpu_repack(layer) -> None:
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    w = layer.weight
    w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    layer.quant_state = w.quant_state


def guard_4bit(model: nn.Module) -> None:
    """Keep every Linear4bit of `model` on bitsandbytes' autograd path. Idempotent.

    The trap, bitsandbytes 0.50.2 (bitsandbytes/nn/modules.py, Linear4bit):
      * `__init__` stores `self.support_avx512bf16_for_cpu = has_avx512bf16()` (a native CPU probe).
      * `forward` repacks the weight in place, once and for good, when
            x.device.type == "cpu" and self.support_avx512bf16_for_cpu
            and not self.training and x.requires_grad == False
            and not quant_state.packing_format_for_cpu
        i.e. the first no-grad forward of an eval() layer on such a CPU. The repack
        (functional._convert_weight_packed_for_cpu) rewrites the uint8 nibbles into a blocked
        [N, K/2] layout for the AVX512-BF16 kernel, drops double quant (absmax -> bf16, transposed)
        and sets quant_state.packing_format_for_cpu = True.
      * From then on `bnb.matmul_4bit` (autograd/_functions.py) sees packing_format_for_cpu and, for
        every CPU call, grad enabled or not, returns `F.gemv_4bit(...)`: a raw custom op with no
        autograd formula instead of `MatMul4Bit.apply`. Its output is cut off from the input's
        graph, so the layer passes no gradient to its input: the soft-prompt gradient silently
        keeps only the residual-stream part (wrong, or zero for a model without residuals).
    The guard sets `support_avx512bf16_for_cpu = False` on each layer, which makes the repack
    condition false forever for that layer (the price: no-grad CPU inference uses the generic
    dequantize + matmul instead of the AVX512-BF16 gemv). A layer that was already repacked before
    the guard ran is converted back with bitsandbytes' own inverse; that inverse is lossy (absmax
    went through bf16 and is re-double-quantized), so a warning says so. Models quantized by
    `quantize_linear_layers` are guarded before any forward and never hit that case.
    Call it again on any model whose Linear4bit layers were built elsewhere (HF from_pretrained
    with a BitsAndBytesConfig, load_state_dict into fresh layers), before its first forward.
    """
    try:
        layers = _iter_linear4bit(model)
    except ImportError:
        return
    undone = 0
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
        state = getattr(layer.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            _undo_cpu_repack(layer)
            undone += 1
    if undone:
        logger.warning(
            "guard_4bit: %d Linear4bit layer(s) had already been repacked for the CPU AVX512-BF16 "
            "kernel (a no-grad eval forward ran before the guard); converted back, with the "
            "block scales rounded through bf16. Call guard_4bit before the first forward.", undone)


class NF4Fused(nn.Module):
    """One or more NF4 layers that read the same input (q/k/v, gate/up), computed in one launch by
    spt_fast.kernels.nf4 from the bitsandbytes tensors themselves (shared, not copied).

    Output: one tensor per layer (a tuple), or the tensor itself for a single layer. Inference
    only (no autograd): the generation engine attaches these to its own view of the model.
    """

    def __init__(self, layers):
        super().__init__()
        from ..kernels.nf4 import group_from_bnb

        self.group = group_from_bnb(list(layers), layers[0].compute_dtype)
        # Registered as buffers, so torch.compile/CUDA graphs treat them as fixed-address module state.
        for i, s in enumerate(self.group.segments):
            for name in ("packed", "absmax", "absmax2", "offset"):
                if getattr(s, name) is not None:
                    self.register_buffer(f"{name}{i}", getattr(s, name), persistent=False)
        self.register_buffer("code", self.group.code, persistent=False)
        if self.group.code2 is not None:
            self.register_buffer("code2", self.group.code2, persistent=False)

    def forward(self, x):
        from ..kernels.nf4 import nf4_linear

        y = nf4_linear(x.to(self.group.dtype), self.group)
        if len(self.group.segments) == 1:
            return y
        return y.split(self.group.sizes, dim=-1)


def attach_nf4_kernels(llama) -> bool:
    """Give each block of a compact Llama view fused NF4 modules (q/k/v, o, gate/up, down).

    The view's own Attention/FeedForward objects get them, so the HF model behind it (and any
    training view) keep their bitsandbytes layers. Returns False (nothing attached) when any layer
    is not NF4 or is of a shape the kernels do not take.
    """
    cls = _linear4bit_class()
    plans = []
    for block in llama.layers:
        a, f = block.attention, block.feed_forward
        groups = [[a.wq, a.wk, a.wv], [a.wo], [f.w1, f.w3], [f.w2]]
        if not all(isinstance(m, cls) for g in groups for m in g):
            return False
        try:
            plans.append([NF4Fused(g) for g in groups])
        except ValueError as exc:
            logger.info("NF4 kernels not used: %s", exc)
            return False
    for block, (qkv, o, gate_up, down) in zip(llama.layers, plans):
        block.attention.fused_qkv, block.attention.wo = qkv, o
        block.feed_forward.fused_gate_up, block.feed_forward.w2 = gate_up, down
    return True
