"""Benchmarks behind `spt-fast bench`: they ship with the package, so they run from any install.

`train`: one SPT training step, the straightforward approach (DESIGN §2) vs the prefix and shared
layouts; `generate`: transformers `generate` vs the generation engine (time to first token,
decode speed); `kernels` + `ops/`: each Triton kernel vs its PyTorch reference; `timing`: the
timing loop and the pytest-benchmark glue used by the cases in the repo's bench/ folder.
"""
