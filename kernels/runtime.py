"""Run-time choices every kernel file shares: Triton kernel or PyTorch reference, the CUDA device
a launch runs under, and how `tl.dot` multiplies for a dtype."""
import contextlib
import os

import torch

try:
    import triton

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton missing on some platforms
    triton = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests on machines without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton for CUDA tensors; the reference elsewhere. SPT_FAST_NO_TRITON=1 forces the reference."""
    if not HAS_TRITON or os.environ.get("SPT_FAST_NO_TRITON", "0") == "1":
        return False
    return all(t.is_cuda for t in tensors if t is not None)


def native_gpu(t: torch.Tensor) -> bool:
    """A native GPU launch (not the interpreter): picks tile sizes and dot modes."""
    return t.is_cuda and not interpreting()


def device_guard(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device, which may be another one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dot_modes(dtype: torch.dtype, gpu: bool) -> tuple[bool, str]:
    """(upcast tiles to fp32 before tl.dot, tl.dot input_precision).

    The interpreter computes bf16 tl.dot wrongly, so tiles are upcast there; on the GPU fp32 inputs
    use exact ("ieee") products rather than tf32 so fp32 results match the reference.
    """
    dot_fp32 = (not gpu) or dtype == torch.float32
    return dot_fp32, ("ieee" if dot_fp32 else "tf32")


def pow2(n: int, lo: int, hi: int) -> int:
    """The power of two at or above n, clamped to [lo, hi] (tile sizes)."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))
