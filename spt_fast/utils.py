"""Helpers every stage uses: dtype names, peak memory, and atomic file writes."""
import math
import os
import resource
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import SPTError

# The one mapping between the dtype names users type and torch dtypes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = tuple(DTYPES)
_ALIASES = {"float32": "fp32", "bfloat16": "bf16"}


def resolve_dtype(name) -> torch.dtype:
    """'fp32' / 'bf16' (or 'float32' / 'bfloat16', or a torch dtype of those) -> torch dtype."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    try:
        return DTYPES[_ALIASES.get(name, name)]
    except (KeyError, TypeError):
        raise SPTError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}") from None


def dtype_name(dtype) -> str:
    """torch dtype (or a name) -> 'fp32' / 'bf16'."""
    dtype = resolve_dtype(dtype)
    return next(k for k, v in DTYPES.items() if v == dtype)


def release_freed_memory() -> None:
    """Hand memory that was freed back to the OS (glibc's malloc_trim; nothing elsewhere). After
    many large buffers were allocated and freed (a model drawn and quantized layer by layer) glibc
    keeps the freed pages in its heap, and the process's resident size stays that much higher."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc


# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD = -3).
_M_MMAP_THRESHOLD = -3


def bound_heap_retention(threshold: int = 4 * 2 ** 20) -> bool:
    """Serve every allocation of `threshold` bytes or more by its own mmap, returned to the OS on free.

    glibc raises its mmap threshold (up to 32 MiB) each time it frees a mapped block, after which
    tensors of a few MiB live in the heap and their freed pages stay resident: a CPU training step
    of a 7B NF4 model then ended ~0.5 GiB above what its tensors held. Setting the threshold fixes
    it at `threshold`. Costs page faults on each large allocation, so only the memory-bound CPU
    paths (4-bit training, `bench memory`) use it. Returns whether glibc took it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False  # not glibc


def peak_memory_bytes() -> int:
    """Peak CUDA memory allocated when a GPU is in use, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _readable(path) -> None:
    # mkstemp/mkdtemp make owner-only entries; results, checkpoints and adapters are for everyone
    # to read, as files written the ordinary way would be (umask applied).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def atomic_write(path, write) -> Path:
    """Write a file through `write(tmp_path)` into a temporary sibling, then rename it into place:
    a reader never sees half a file and a crash leaves any previous version intact."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_tensors_atomic(path, tensors: dict, metadata: dict | None = None) -> Path:
    """A safetensors file of CPU copies of `tensors`, written atomically."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def make_temp_dir(parent, prefix: str) -> Path:
    """A temporary folder beside its final place (renamed into place when complete), readable
    like an ordinary folder."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    _readable(tmp)
    return tmp


def check_number(name: str, value, low: float = 0.0, strict: bool = True, integer: bool = False) -> None:
    """SPTError naming `name` (a flag, say) unless value is a finite number > low (>= low when not
    strict), and an integer when asked."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if strict else value >= low)
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise SPTError(f"{name} must be {what} {'>' if strict else '>='} {low:g}, got {value!r}")


def cpu_info() -> dict:
    """{'model': CPU model name, 'flags': set of feature flags} from /proc/cpuinfo (Linux)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": flags}


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX)."""
    flags = cpu_info()["flags"]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def round_up(n: int, m: int) -> int:
    """n rounded up to a multiple of m."""
    return -(-n // m) * m
