"""pytest-benchmark cases of the inject kernel vs its reference (CUDA only).

The shapes, inputs and steps are spt_fast.benchmarks.ops.inject (also behind `spt-fast bench kernels`).
Run: `pytest bench/bench_inject.py -o python_files='bench_*.py'`.
"""
from spt_fast.benchmarks.ops.inject import IMPLS, SHAPES, make_step
from spt_fast.benchmarks.timing import benchmark_step, kernel_cases


@kernel_cases("inject", SHAPES, IMPLS)
def test_bench_inject(benchmark, impl, mode, shape):
    benchmark_step(benchmark, make_step(impl, mode, shape, "cuda"), f"inject-{shape[0]}-{mode}")
