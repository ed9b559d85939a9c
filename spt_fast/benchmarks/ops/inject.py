"""Prompt injection: reference (index + where over the whole output) vs the Triton copy kernels.

pytest-benchmark cases: bench/bench_inject.py (skipped without CUDA); `spt-fast bench kernels --op inject`.
Programmatic: `run(device="cuda")` -> rows {"op", "impl", "mode", "shape", "ms"}; on "cpu" only the
reference is timed (the Triton kernels would run in the interpreter, which measures nothing).
The op is a memory copy: N*(T+L)*d elements out; the backward reads the prompt slots (and, when
the tokens need grads, every other slot) back.
Timing, the run loop and the pytest-benchmark plumbing are in spt_fast.benchmarks.timing.
"""
from __future__ import annotations

import torch

from ..timing import run_bench
from ...kernels.inject import inject_prompts_ref, inject_prompts_triton

# (name, B samples, K prompts, T tokens, L, d, layout, token grads): the engine's training call
# (all K prompts, frozen bf16 tokens), the shared layout on Llama-2-7b, and a case where the
# token embeddings need grads too (tokens from a trainable upstream).
SHAPES = [
    ("smollm2-135m-prefix", 8, 4, 256, 8, 576, "prefix", False),
    ("opt-2.7b-prefix", 2, 4, 480, 8, 2560, "prefix", False),
    ("llama2-7b-shared", 2, 4, 448, 1, 4096, "shared", False),
    ("llama2-7b-shared-tokgrad", 2, 4, 448, 1, 4096, "shared", True),
]
IMPLS = {"ref": inject_prompts_ref, "triton": inject_prompts_triton}


def make_inputs(shape, device, dtype=torch.bfloat16):
    _, b, k, t, l, d, layout, token_grad = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randn(b, t, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(token_grad)
    prompts = torch.randn(k, l, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    n = k * b
    row_src = (torch.arange(n) % b).to(device)
    prompt_idx = (torch.arange(n) // b).to(device)
    if layout == "prefix":
        pos = torch.zeros(n, dtype=torch.long)
    else:
        pos = torch.randint(t // 2, t + 1, (b,), generator=gen)[torch.arange(n) % b]  # ragged contexts
    grad_out = torch.randn(n, t + l, d, generator=gen).to(device=device, dtype=dtype)
    return (tokens, prompts, row_src, prompt_idx, pos.to(device)), grad_out


def make_step(impl: str, mode: str, shape, device):
    fn = IMPLS[impl]
    inputs, grad_out = make_inputs(shape, device)
    params = tuple(x for x in inputs[:2] if x.requires_grad)
    if mode == "fwd":
        def step():
            fn(*inputs)
    elif mode == "bwd":
        out = fn(*inputs)

        def step():
            torch.autograd.grad(out, params, grad_out, retain_graph=True)
    else:
        def step():
            torch.autograd.grad(fn(*inputs), params, grad_out)
    return step


def shape_label(shape) -> str:
    name, b, k, t, l, d, layout, token_grad = shape
    return f"{name} N={k * b} T={t} L={l} d={d}" + (" +tok-grad" if token_grad else "")


def run(device: str = "cuda") -> list[dict]:
    return run_bench("inject", SHAPES, IMPLS, make_step, shape_label, device)
