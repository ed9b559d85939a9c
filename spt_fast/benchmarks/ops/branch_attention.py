"""Branch attention: reference (gathers K copies of the context, dense mask, fp32) vs Triton.

pytest-benchmark cases: bench/bench_branch_attention.py (skipped without CUDA); `spt-fast bench kernels --op branch_attention`.
Programmatic: `run(device="cuda")` -> rows {"op", "impl", "mode", "shape", "ms"}; on "cpu" only
the reference is timed (the Triton kernels would run in the interpreter, which measures nothing),
on the first two shapes with few repetitions (the full set takes minutes on a CPU).
Timing, the run loop and the pytest-benchmark plumbing are in spt_fast.benchmarks.timing.
"""
from __future__ import annotations

import torch

from ..timing import run_bench
from ...kernels.branch_attention import branch_attention_ref, branch_attention_triton

# (name, K prompts, B samples, H, Hkv, Tb = L + response, Tc = context, D): typical ConvAI2 lengths.
SHAPES = [
    ("smollm2-135m", 4, 8, 9, 3, 48, 256, 64),
    ("llama2-7b", 4, 2, 32, 32, 40, 448, 128),
    ("llama2-7b-long", 4, 2, 32, 32, 128, 384, 128),
]
IMPLS = {"ref": branch_attention_ref, "triton": branch_attention_triton}


def make_inputs(shape, device, dtype=torch.bfloat16):
    _, k_prompts, b, h, hkv, tb, tc, d = shape
    n = k_prompts * b
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size, grad=False):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    q, k, v = randn(n, h, tb, d, grad=True), randn(n, hkv, tb, d, grad=True), randn(n, hkv, tb, d, grad=True)
    ctx_k, ctx_v = randn(b, hkv, tc, d), randn(b, hkv, tc, d)
    ctx_len = torch.randint(tc // 2, tc + 1, (b,), generator=gen).to(device)  # ragged contexts
    sample_of = (torch.arange(n) % b).to(device)  # prompt-major branch order, as the engine builds it
    return (q, k, v, ctx_k, ctx_v, ctx_len, sample_of), randn(n, h, tb, d)


def make_step(impl: str, mode: str, shape, device):
    """A zero-argument callable doing one `mode` step of `impl` on fresh inputs."""
    fn = IMPLS[impl]
    inputs, grad_out = make_inputs(shape, device)
    q, k, v = inputs[:3]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(*inputs)
    elif mode == "bwd":
        out = fn(*inputs)

        def step():
            # retain_graph lets the same forward be differentiated once per repetition.
            torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    else:
        def step():
            torch.autograd.grad(fn(*inputs), (q, k, v), grad_out)
    return step


def shape_label(shape) -> str:
    name, k_prompts, b, h, hkv, tb, tc, d = shape
    return f"{name} N={k_prompts * b} H={h}/{hkv} Tb={tb} Tc={tc} D={d}"


def run(device: str = "cuda") -> list[dict]:
    return run_bench("branch_attention", SHAPES, IMPLS, make_step, shape_label, device,
                     cpu_shapes=SHAPES[:2], gpu=(3, 20), cpu=(1, 3))
