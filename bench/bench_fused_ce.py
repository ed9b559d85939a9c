"""pytest-benchmark cases of the fused ce kernel vs its reference (CUDA only).

The shapes, inputs and steps are spt_fast.benchmarks.ops.fused_ce (also behind `spt-fast bench kernels`).
Run: `pytest bench/bench_fused_ce.py -o python_files='bench_*.py'`.
"""
from spt_fast.benchmarks.ops.fused_ce import IMPLS, SHAPES, make_step
from spt_fast.benchmarks.timing import benchmark_step, kernel_cases


@kernel_cases("fused_ce", SHAPES, IMPLS)
def test_bench_fused_ce(benchmark, impl, mode, shape):
    benchmark_step(benchmark, make_step(impl, mode, shape, "cuda"), f"fused_ce-{shape[0]}-{mode}")
