"""pytest-benchmark cases of the retrieval kernel vs its reference (CUDA only).

The shapes, inputs and steps are spt_fast.benchmarks.ops.retrieval (also behind `spt-fast bench kernels`).
Run: `pytest bench/bench_retrieval.py -o python_files='bench_*.py'`.
"""
from spt_fast.benchmarks.ops.retrieval import IMPLS, SHAPES, make_step
from spt_fast.benchmarks.timing import benchmark_step, kernel_cases


@kernel_cases("retrieval", SHAPES, IMPLS)
def test_bench_retrieval(benchmark, impl, mode, shape):
    benchmark_step(benchmark, make_step(impl, mode, shape, "cuda"), f"retrieval-{shape[0]}-{mode}")
