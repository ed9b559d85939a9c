"""Fused linear + CE: reference (fp32 logits for all K*B*T rows, plus the mixed logits) vs Triton.

pytest-benchmark cases: bench/bench_fused_ce.py (skipped without CUDA); `spt-fast bench kernels --op fused_ce`.
Programmatic: `run(device="cuda")` -> rows {"op", "impl", "mode", "shape", "ms", "peak_mem_bytes"};
on "cpu" only the reference is timed (the Triton kernels would run in the interpreter, which
measures nothing), on the first shape only. peak_mem_bytes is the CUDA peak above what the inputs
already hold (0 on CPU).
Timing, the run loop and the pytest-benchmark plumbing are in spt_fast.benchmarks.timing.
"""
from __future__ import annotations

import torch

from ..timing import run_bench
from ...kernels.fused_ce import fused_linear_ce_ref, fused_linear_ce_triton

# (name, K prompts, B samples, T response slots, d, V): the paper's batch of 2 on OPT-125m and
# Llama-2-7b heads, and a larger batch where materialised logits start to hurt.
SHAPES = [
    ("opt-125m", 4, 2, 32, 768, 50272),
    ("llama2-7b", 4, 2, 32, 4096, 32000),
    ("llama2-7b-b8", 4, 8, 64, 4096, 32000),
]
IMPLS = {"ref": fused_linear_ce_ref, "triton": fused_linear_ce_triton}


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


def shape_label(shape) -> str:
    name, k_prompts, b, t, d, v = shape
    return f"{name} K={k_prompts} B={b} T={t} d={d} V={v}"


def run(device: str = "cuda") -> list[dict]:
    # A CPU step on the 7b heads takes seconds: one shape and three repetitions say enough there.
    return run_bench("fused_linear_ce", SHAPES, IMPLS, make_step, shape_label, device,
                     cpu_shapes=SHAPES[:1], gpu=(3, 20), cpu=(1, 3), peak_mem=True)
