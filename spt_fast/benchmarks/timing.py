"""Timing plumbing of the kernel benchmarks (benchmarks.ops.* and the repo's bench/ cases).

Each benchmarks/ops/<op>.py keeps what is specific to its op (SHAPES, IMPLS, make_inputs,
make_step, shape_label, run) and gets the rest from here: timing (`time_ms`, CUDA events on GPU,
fewer repetitions on CPU), CUDA peak memory (`peak_mem_bytes`), the shapes x impls x modes loop
(`run_bench`), and the pytest-benchmark side (`kernel_cases`, `benchmark_step`) used by bench/.
On a CPU only the torch references are timed: the Triton kernels would run in the interpreter,
which measures nothing. pytest is needed only to collect the benchmark tests.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Sequence

import torch

MODES = ("fwd", "bwd", "full")
GPU_TIMING = (3, 30)  # (warm-up steps, timed repetitions) on a GPU
CPU_TIMING = (1, 5)  # CPU timings are only a reference point


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def time_ms(step: Callable[[], object], device, warmup: int | None = None, reps: int | None = None, *,
            gpu: tuple[int, int] = GPU_TIMING, cpu: tuple[int, int] = CPU_TIMING) -> float:
    """Median wall time of `step()` in ms (CUDA events on GPU so queued work is counted, not launch
    time). warmup/reps default to `gpu` or `cpu` = (warm-up steps, timed repetitions)."""
    on_gpu = is_cuda(device)
    default_warmup, default_reps = gpu if on_gpu else cpu
    warmup = default_warmup if warmup is None else warmup
    reps = default_reps if reps is None else reps
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(reps):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mem_bytes(step: Callable[[], object], device) -> int:
    """Peak CUDA memory of one step above what was allocated before it (inputs, saved graph);
    0 off CUDA."""
    if not is_cuda(device):
        return 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def run_bench(op: str, shapes: Sequence, impls: Mapping[str, Callable], make_step: Callable,
              shape_label: Callable, device: str = "cuda", *, modes: Sequence[str] = MODES,
              cpu_shapes: Sequence | None = None, gpu: tuple[int, int] = GPU_TIMING,
              cpu: tuple[int, int] = CPU_TIMING, peak_mem: bool = False) -> list[dict]:
    """Time `make_step(impl, mode, shape, device)` for every shape x impl x mode.

    Rows are {"op", "impl", "mode", "shape", "ms"}, plus "peak_mem_bytes" when `peak_mem` (cached
    CUDA blocks are then handed back between cases so one case's buffers do not crowd the next).
    On CPU only the "ref" impl runs, over `cpu_shapes` (default: all shapes), with `cpu` timing."""
    on_gpu = is_cuda(device)
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"{op} benchmark: CUDA requested but no GPU is available")
    impl_names = list(impls) if on_gpu else ["ref"]
    rows = []
    for shape in (shapes if on_gpu or cpu_shapes is None else cpu_shapes):
        for impl in impl_names:
            for mode in modes:
                step = make_step(impl, mode, shape, device)
                row = {"op": op, "impl": impl, "mode": mode, "shape": shape_label(shape),
                       "ms": round(time_ms(step, device, gpu=gpu, cpu=cpu), 4)}
                if peak_mem:
                    row["peak_mem_bytes"] = peak_mem_bytes(step, device)
                rows.append(row)
                del step
                if peak_mem and on_gpu:
                    torch.cuda.empty_cache()
    return rows


# ---- pytest-benchmark --------------------------------------------------------------------------
def needs_cuda(what: str):
    """skipif marker: `what` benchmark needs CUDA."""
    import pytest

    return pytest.mark.skipif(not torch.cuda.is_available(), reason=f"{what} benchmark needs CUDA")


def kernel_cases(what: str, shapes: Sequence, impls: Mapping[str, Callable], modes: Sequence[str] = MODES):
    """Decorator for a `test_...(benchmark, impl, mode, shape)`: parametrised over impls, modes
    and shapes (ids "impl-mode-shapename") and skipped without CUDA. Without pytest (run() or
    `spt-fast bench kernels` in an install lacking the dev extras) it leaves the function alone."""
    try:
        import pytest
    except ImportError:
        return lambda fn: fn

    def decorate(fn):
        fn = pytest.mark.parametrize("impl", list(impls))(fn)
        fn = pytest.mark.parametrize("mode", list(modes))(fn)
        fn = pytest.mark.parametrize("shape", list(shapes), ids=[s[0] for s in shapes])(fn)
        return needs_cuda(what)(fn)

    return decorate


def benchmark_step(benchmark, step: Callable[[], object], group: str, *, peak_mem: bool = False) -> None:
    """The body of a kernel benchmark test: one untimed call (Triton compiles there), optionally the
    step's CUDA peak memory in extra_info, then pytest-benchmark rounds that wait for the GPU."""
    step()
    if peak_mem:
        benchmark.extra_info["peak_mem_bytes"] = peak_mem_bytes(step, "cuda")

    def synced():
        step()
        torch.cuda.synchronize()

    benchmark.group = group
    benchmark(synced)


def read_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Bytes per second this machine reads from memory with torch's threads (best of `reps` sums
    over a buffer far larger than the caches): the roofline a CPU decode step is bound by."""
    return bandwidth_probe(gib, reps)()


def bandwidth_probe(gib: float = 0.25, reps: int = 3) -> Callable[[], float]:
    """read_bandwidth as a callable that keeps its buffer: each reading then takes a few tens of
    ms, so a benchmark can read the bandwidth beside each timing (on a shared VM it moves by 1.5x
    between phases of one run, and a step is bound by the bandwidth of its own moment)."""
    buf = torch.ones(int(gib * 2 ** 30) // 4, dtype=torch.float32)
    buf.sum()  # pages touched before timing

    def reading() -> float:
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t0)
        return buf.numel() * 4 / best

    return reading
