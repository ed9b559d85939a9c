"""Shared plumbing of the kernel benchmarks in the repo's bench/ folder and `spt-fast bench kernels`.

Each bench/bench_<op>.py keeps what is specific to its op (SHAPES, IMPLS, make_inputs, make_step,
shape_label) and gets the rest from here: timing (`time_ms`, CUDA events on GPU, fewer repetitions
on CPU), CUDA peak memory (`peak_mem_bytes`), the shapes x impls x modes loop (`run_bench`), and the
pytest-benchmark side (`kernel_cases`, `benchmark_step`). On a CPU only the torch references are
timed: the Triton kernels would run in the interpreter, which measures nothing.

`spt-fast bench kernels [--op OP ...] [--device DEV] [--json FILE]` imports those bench files by
path (they live next to the package in a source checkout, not in the wheel), runs each one's
`run(device)` and prints a table; on GPU it adds each Triton case's speed-up over the reference.
pytest is needed only to collect the benchmark tests, never by `run()` or the command.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .errors import SPTError

KERNEL_OPS = ("inject", "retrieval", "branch_attention", "fused_ce")
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


# ---- spt-fast bench kernels --------------------------------------------------------------------
def bench_dir() -> Path:
    """The repo's bench/ folder, next to the package (a source checkout, e.g. an editable install)."""
    import spt_fast

    return Path(spt_fast.__file__).resolve().parent.parent / "bench"


def load_bench(op: str, folder: Path | None = None):
    """Import bench/bench_<op>.py by file path (the bench files are not a package)."""
    folder = bench_dir() if folder is None else folder
    path = folder / f"bench_{op}.py"
    if not path.is_file():
        raise SPTError(f"kernel benchmark not found: {path}. The benchmarks ship with the source repository, "
                       f"not the wheel: run from a checkout installed with `pip install -e .`")
    name = f"spt_fast_bench_{op}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        del sys.modules[name]
        raise SPTError(f"cannot import {path}: {e}") from e
    if not callable(getattr(module, "run", None)):
        del sys.modules[name]
        raise SPTError(f"{path} has no run(device) function")
    return module


def format_kernel_rows(rows: Sequence[dict], gpu: bool) -> str:
    """Markdown table; on GPU each non-reference row gets its speed-up over "ref" (ref ms / its ms)
    for the same (op, mode, shape), and rows with a peak memory show it in MiB."""
    ref_ms = {(r["op"], r["mode"], r["shape"]): r["ms"] for r in rows if r["impl"] == "ref"}
    head = ["op", "impl", "mode", "shape", "ms"]
    show_mem = gpu and any("peak_mem_bytes" in r for r in rows)
    if gpu:
        head.append("speed-up vs ref")
    if show_mem:
        head.append("peak MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["op"], r["impl"], r["mode"], r["shape"], f"{r['ms']:.3f}"]
        if gpu:
            ref = ref_ms.get((r["op"], r["mode"], r["shape"]))
            cells.append(f"{ref / r['ms']:.2f}x" if r["impl"] != "ref" and ref and r["ms"] > 0 else "")
        if show_mem:
            cells.append(f"{r['peak_mem_bytes'] / 2**20:.1f}" if "peak_mem_bytes" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_kernels_parser(sub) -> None:
    p = sub.add_parser("kernels", help="Triton kernels vs their torch references (bench/bench_<op>.py)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--op", action="append", choices=KERNEL_OPS, help="repeat to pick (default: all four)")
    p.add_argument("--device", default=None,
                   help="default: cuda if available, else cpu (on cpu only the references are timed)")
    p.add_argument("--json", default=None, help="write the rows here")


def run_kernels_cli(a) -> list[dict]:
    device = a.device or default_device()
    try:
        gpu = is_cuda(device)
    except RuntimeError as e:
        raise SPTError(f"--device {device!r}: {e}") from e
    if gpu and not torch.cuda.is_available():
        raise SPTError(f"--device {device}: no CUDA GPU is available (use --device cpu to time the references)")
    if gpu and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise SPTError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    ops = list(dict.fromkeys(a.op or KERNEL_OPS))
    folder = bench_dir()
    modules = [load_bench(op, folder) for op in ops]  # a missing file fails before any timing
    if gpu:
        print(f"kernel benchmarks on {device} ({torch.cuda.get_device_name(torch.device(device))}): "
              f"Triton vs torch reference; speed-up = ref ms / triton ms")
    else:
        print(f"kernel benchmarks on {device}: only the torch references are timed (the Triton kernels would "
              f"run in the interpreter, which measures nothing); fewer repetitions, and for the slow ops fewer "
              f"shapes, than on GPU")
    rows = []
    for op, module in zip(ops, modules):
        t0 = time.perf_counter()
        print(f"  {op} ...", end="", file=sys.stderr, flush=True)
        op_rows = module.run(device)
        print(f" {len(op_rows)} cases in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        rows.extend(op_rows)
    print(format_kernel_rows(rows, gpu))
    if a.json:
        try:
            path = Path(a.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=2) + "\n")
        except OSError as e:
            raise SPTError(f"--json {a.json}: cannot write: {e}") from e
        print(f"wrote {len(rows)} rows to {a.json}")
    return rows
