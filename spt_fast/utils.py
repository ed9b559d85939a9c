"""Small shared helpers: dtypes, memory, seeding."""
import resource
import sys

import torch

from .errors import SPTError

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise SPTError(f"dtype must be fp32 or bf16, got {name!r}") from None


def peak_memory_bytes() -> int:
    """Peak CUDA memory allocated when a GPU is in use, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
