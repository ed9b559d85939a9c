"""CPU projections of a decode step (SmolLM2-135M shapes): the BLAS vs oneDNN-packed vs this
project's C kernel (cpu_native.dense_mm) vs the compiled product-sum, the candidates
spt_fast.model.cpu_projections chooses from.

For each shape and row count it prints the time of one call and, for one row, the weight bytes
read per second (the decode step is bound by reading weights); for 16 rows, GFLOP/s. Every timed
call cycles through enough copies of the weight to leave the caches (~300 MB), as a decode step
does. The compiled product-sum pays a compiled-call overhead (~20-40 us) per call here that it does
not pay inside a step, where all projections are one compiled graph. Compare the columns of one
run; CPU timings move between runs.
Usage: python bench/cpu_projections.py [--dtype fp32|bf16] [--rows 1,16]
"""
import argparse
import time

import torch
import torch.nn.functional as F

from spt_fast.model import cpu_native
from spt_fast.model.cpu_projections import gemv

SHAPES = {"q/k/v": (960, 576), "o": (576, 576), "gate/up": (3072, 576), "down": (576, 1536), "lm head": (49152, 576)}


def best_us(fn, copies, seconds=0.5):
    for i in range(len(copies)):
        fn(i)
    best = float("inf")
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t = time.perf_counter()
        for i in range(len(copies)):
            fn(i)
        best = min(best, (time.perf_counter() - t) / len(copies))
    return best * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--rows", default="1,16")
    a = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    onednn = torch.backends.mkldnn.is_available()
    compiled_gemv = torch.compile(gemv, dynamic=False)
    print(f"{a.dtype}, {torch.get_num_threads()} threads, oneDNN {'on' if onednn else 'off'}")
    for rows in (int(r) for r in a.rows.split(",")):
        print(f"\n{rows} row(s): us per call ({'GB/s of weights' if rows == 1 else 'GFLOP/s'})")
        for name, (n, k) in SHAPES.items():
            nbytes = n * k * torch.finfo(dtype).bits // 8
            copies = [torch.randn(n, k).to(dtype) for _ in range(max(2, int(300e6 // nbytes)))]
            x = torch.randn(rows, k).to(dtype)
            impls = {"BLAS row-major": lambda i: F.linear(x, copies[i]),
                     "BLAS col-major": (lambda cm: lambda i: F.linear(x, cm[i]))([w.t().contiguous().t() for w in copies])}
            if onednn:
                packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in copies]
                impls["oneDNN packed"] = lambda i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")
            if cpu_native.dense_applies(copies[0]):
                native = [cpu_native.pack_dense(w) for w in copies]
                impls["C dense_mm"] = lambda i: cpu_native.dense_mm(x, native[i])
            if rows == 1:
                impls["compiled product-sum"] = lambda i: compiled_gemv(x, copies[i])
            cells = []
            with torch.no_grad():
                for label, fn in impls.items():
                    us = best_us(fn, copies)
                    rate = nbytes / us / 1e3 if rows == 1 else 2 * rows * n * k / us / 1e3
                    cells.append(f"{label} {us:8.1f} ({rate:5.1f})")
            print(f"  {name:8s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
