"""`spt-fast bench kernels`: each Triton kernel against its PyTorch reference.

The ops' shapes and steps are benchmarks.ops.<op> (installed with the package, so the command
works from a wheel too); on GPU each Triton case gets its speed-up over the reference.
"""
from __future__ import annotations

import importlib
import sys
import time
from typing import Sequence

import torch

from ..errors import SPTError
from .timing import is_cuda

KERNEL_OPS = ("inject", "retrieval", "branch_attention", "fused_ce")


def check_device(device: str) -> bool:
    """True for a usable CUDA device, False for the CPU; SPTError naming --device otherwise."""
    try:
        gpu = is_cuda(device)
    except RuntimeError as e:
        raise SPTError(f"--device {device!r}: {e}") from e
    if gpu and not torch.cuda.is_available():
        raise SPTError(f"--device {device}: no CUDA GPU is available (use --device cpu to time the references)")
    if gpu and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise SPTError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return gpu


def run_kernel_benchmarks(ops: Sequence[str], device: str) -> list[dict]:
    """Rows {"op", "impl", "mode", "shape", "ms"(, "peak_mem_bytes")} for each op, in order."""
    unknown = [op for op in ops if op not in KERNEL_OPS]
    if unknown:
        raise SPTError(f"unknown kernel op(s) {unknown}; choose from {KERNEL_OPS}")
    rows = []
    for op in ops:
        module = importlib.import_module(f"{__package__}.ops.{op}")
        t0 = time.perf_counter()
        print(f"  {op} ...", end="", file=sys.stderr, flush=True)
        op_rows = module.run(device)
        print(f" {len(op_rows)} cases in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        rows.extend(op_rows)
    return rows


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
