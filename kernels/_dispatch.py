"""Run-time choice between a Triton kernel and its PyTorch reference."""
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton missing on some platforms
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests on machines without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton for CUDA tensors; the reference elsewhere. SPT_FAST_NO_TRITON=1 forces the reference."""
    if not HAS_TRITON or os.environ.get("SPT_FAST_NO_TRITON", "0") == "1":
        return False
    return all(t.is_cuda for t in tensors if t is not None)
