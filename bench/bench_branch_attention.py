"""Branch attention: reference (gathers K copies of the context, dense mask, fp32) vs Triton.

pytest-benchmark: `pytest bench/bench_branch_attention.py` (skipped without CUDA).
Programmatic: `run(device="cuda")` -> rows {"op", "impl", "mode", "shape", "ms"}; on "cpu" only
the reference is timed (the Triton kernels would run in the interpreter, which measures nothing).
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from spt_fast.kernels.branch_attention import branch_attention_ref, branch_attention_triton

# (name, K prompts, B samples, H, Hkv, Tb = L + response, Tc = context, D): typical ConvAI2 lengths.
SHAPES = [
    ("smollm2-135m", 4, 8, 9, 3, 48, 256, 64),
    ("llama2-7b", 4, 2, 32, 32, 40, 448, 128),
    ("llama2-7b-long", 4, 2, 32, 32, 128, 384, 128),
]
IMPLS = {"ref": branch_attention_ref, "triton": branch_attention_triton}
MODES = ("fwd", "bwd", "full")


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


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(step, device, warmup=3, reps=20):
    """Median wall time in ms (CUDA events on GPU so queued work is counted, not launch time)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
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


def shape_label(shape) -> str:
    name, k_prompts, b, h, hkv, tb, tc, d = shape
    return f"{name} N={k_prompts * b} H={h}/{hkv} Tb={tb} Tc={tc} D={d}"


def run(device: str = "cuda") -> list[dict]:
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench_branch_attention.run: CUDA requested but no GPU is available")
    impls = list(IMPLS) if torch.device(device).type == "cuda" else ["ref"]
    rows = []
    for shape in SHAPES:
        for impl in impls:
            for mode in MODES:
                ms = time_ms(make_step(impl, mode, shape, device), device)
                rows.append({"op": "branch_attention", "impl": impl, "mode": mode, "shape": shape_label(shape),
                             "ms": round(ms, 4)})
    return rows


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="branch attention benchmark needs CUDA")


@needs_cuda
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bench_branch_attention(benchmark, impl, mode, shape):
    step = make_step(impl, mode, shape, "cuda")
    step()  # compile outside the timed rounds

    def synced():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"branch_attention-{shape[0]}-{mode}"
    benchmark(synced)


if __name__ == "__main__":
    for row in run("cuda" if torch.cuda.is_available() else "cpu"):
        print(row)
