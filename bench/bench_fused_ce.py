"""Fused linear + CE: reference (fp32 logits for all K*B*T rows, plus the mixed logits) vs Triton.

pytest-benchmark: `pytest bench/bench_fused_ce.py` (skipped without CUDA).
Programmatic: `run(device="cuda")` -> rows {"op", "impl", "mode", "shape", "ms", "peak_mem_bytes"};
on "cpu" only the reference is timed (the Triton kernels would run in the interpreter, which
measures nothing). peak_mem_bytes is the CUDA peak above what the inputs already hold (0 on CPU).
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from spt_fast.kernels.fused_ce import fused_linear_ce_ref, fused_linear_ce_triton

# (name, K prompts, B samples, T response slots, d, V): the paper's batch of 2 on OPT-125m and
# Llama-2-7b heads, and a larger batch where materialised logits start to hurt.
SHAPES = [
    ("opt-125m", 4, 2, 32, 768, 50272),
    ("llama2-7b", 4, 2, 32, 4096, 32000),
    ("llama2-7b-b8", 4, 8, 64, 4096, 32000),
]
IMPLS = {"ref": fused_linear_ce_ref, "triton": fused_linear_ce_triton}
MODES = ("fwd", "bwd", "full")


def make_inputs(shape, device, dtype=torch.bfloat16):
    _, k_prompts, b, t, d, v = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(k_prompts, b, t, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(v, d, generator=gen) * (2.5 / d ** 0.5)).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (b, t), generator=gen)
    # Ragged responses (right padding), as ConvAI2 replies are.
    lengths = torch.randint(t // 2, t + 1, (b,), generator=gen)
    targets[torch.arange(t)[None, :] >= lengths[:, None]] = -100
    scores = (torch.rand(b, k_prompts, generator=gen) * 0.9 + 0.1).to(device).requires_grad_(True)
    return hidden, weight, None, targets.to(device), scores


def make_step(impl: str, mode: str, shape, device):
    """A zero-argument callable doing one `mode` step of `impl` (loss = L_LM-style sum + L_fus)."""
    fn = IMPLS[impl]
    hidden, weight, bias, targets, scores = make_inputs(shape, device)

    def loss_of(seq, fus):
        return seq.sum() + fus

    if mode == "fwd":
        def step():
            # Grad mode on: what a training forward keeps for backward is part of the cost.
            fn(hidden, weight, bias, targets, scores)
    elif mode == "bwd":
        loss = loss_of(*fn(hidden, weight, bias, targets, scores))

        def step():
            # retain_graph lets the same forward be differentiated once per repetition.
            torch.autograd.grad(loss, (hidden, scores), retain_graph=True)
    else:
        def step():
            torch.autograd.grad(loss_of(*fn(hidden, weight, bias, targets, scores)), (hidden, scores))
    return step


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def time_ms(step, device, warmup=3, reps=20):
    """Median wall time in ms (CUDA events on GPU so queued work is counted, not launch time)."""
    if not _is_cuda(device):
        warmup, reps = 1, 3  # a CPU step takes ~1 s; a few samples say enough
    for _ in range(warmup):
        step()
    if _is_cuda(device):
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if _is_cuda(device):
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


def peak_mem_bytes(step, device) -> int:
    """Peak CUDA memory of one step above what was allocated before it (inputs, saved graph)."""
    if not _is_cuda(device):
        return 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def shape_label(shape) -> str:
    name, k_prompts, b, t, d, v = shape
    return f"{name} K={k_prompts} B={b} T={t} d={d} V={v}"


def run(device: str = "cuda") -> list[dict]:
    if _is_cuda(device) and not torch.cuda.is_available():
        raise RuntimeError("bench_fused_ce.run: CUDA requested but no GPU is available")
    impls = list(IMPLS) if _is_cuda(device) else ["ref"]
    shapes = SHAPES if _is_cuda(device) else SHAPES[:1]  # the 7b heads take long on a CPU
    rows = []
    for shape in shapes:
        for impl in impls:
            for mode in MODES:
                step = make_step(impl, mode, shape, device)
                ms = time_ms(step, device)
                rows.append({"op": "fused_linear_ce", "impl": impl, "mode": mode, "shape": shape_label(shape),
                             "ms": round(ms, 4), "peak_mem_bytes": peak_mem_bytes(step, device)})
                del step
                if _is_cuda(device):
                    torch.cuda.empty_cache()
    return rows


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="fused CE benchmark needs CUDA")


@needs_cuda
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bench_fused_ce(benchmark, impl, mode, shape):
    step = make_step(impl, mode, shape, "cuda")
    step()  # compile outside the timed rounds
    benchmark.extra_info["peak_mem_bytes"] = peak_mem_bytes(step, "cuda")

    def synced():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"fused_linear_ce-{shape[0]}-{mode}"
    benchmark(synced)


if __name__ == "__main__":
    for row in run("cuda" if torch.cuda.is_available() else "cpu"):
        print(row)
