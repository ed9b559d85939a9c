"""pytest-benchmark cases of the branch attention kernel vs its reference (CUDA only).

The shapes, inputs and steps are spt_fast.benchmarks.ops.branch_attention (also behind `spt-fast bench kernels`).
Run: `pytest bench/bench_branch_attention.py -o python_files='bench_*.py'`.
"""
from spt_fast.benchmarks.ops.branch_attention import IMPLS, SHAPES, make_step
from spt_fast.benchmarks.timing import benchmark_step, kernel_cases


@kernel_cases("branch_attention", SHAPES, IMPLS)
def test_bench_branch_attention(benchmark, impl, mode, shape):
    benchmark_step(benchmark, make_step(impl, mode, shape, "cuda"), f"branch_attention-{shape[0]}-{mode}")
