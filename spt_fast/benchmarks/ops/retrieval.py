"""SPT retriever scores: reference (separate torch ops) vs the fused Triton kernels.

pytest-benchmark cases: bench/bench_retrieval.py (skipped without CUDA); `spt-fast bench kernels --op retrieval`.
Programmatic: `run(device="cuda")` -> rows {"op", "impl", "mode", "shape", "ms"}; on "cpu" only the
reference is timed (the Triton kernels would run in the interpreter, which measures nothing).
The op is bound by reading W (d x d, fp32 as the engine keeps it) and, in backward, writing dW.
Timing, the run loop and the pytest-benchmark plumbing are in spt_fast.benchmarks.timing.
"""
from __future__ import annotations

from functools import partial

import torch

from ..timing import run_bench
from ...kernels.retrieval import retrieval_ref, retrieval_triton

# (name, B samples, K prompts, L prompt length, d): the paper's batch of 2 with OPT-125m / OPT-2.7b
# (L=8) and Llama-2-7b (L=1), and an evaluation-sized batch on the 7B width.
SHAPES = [
    ("opt-125m", 2, 4, 8, 768),
    ("opt-2.7b", 2, 4, 8, 2560),
    ("llama2-7b", 2, 4, 1, 4096),
    ("llama2-7b-b64", 64, 4, 1, 4096),
]
# The paper's softplus(beta=10, threshold=1) (SPTConfig.score_beta / score_threshold).
IMPLS = {"ref": partial(retrieval_ref, beta=10.0, threshold=1.0),
         "triton": partial(retrieval_triton, beta=10.0, threshold=1.0)}


def make_inputs(shape, device):
    _, b, k, l, d = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    bound = d ** -0.5
    ctx = torch.randn(b, d, generator=gen).to(device)  # pooled frozen embeddings: no grad
    prompts = torch.randn(k, l, d, generator=gen).to(device).requires_grad_(True)
    weight = ((torch.rand(d, d, generator=gen) * 2 - 1) * bound).to(device).requires_grad_(True)
    bias = ((torch.rand(d, generator=gen) * 2 - 1) * bound).to(device).requires_grad_(True)
    upstream = (torch.randn(b, k, generator=gen).to(device), torch.randn(b, k, generator=gen).to(device))
    return (ctx, prompts, weight, bias), upstream


def make_step(impl: str, mode: str, shape, device):
    """A zero-argument callable doing one `mode` step of `impl` (loss uses both scores and log_q,
    as the selection, fusion and contrastive losses do)."""
    fn = IMPLS[impl]
    inputs, (g_scores, g_logq) = make_inputs(shape, device)
    params = inputs[1:]

    def loss_of(scores, log_q, _top):
        return (scores * g_scores).sum() + (log_q * g_logq).sum()

    if mode == "fwd":
        def step():
            fn(*inputs)  # grad mode on: what a training forward saves is part of its cost
    elif mode == "bwd":
        loss = loss_of(*fn(*inputs))

        def step():
            torch.autograd.grad(loss, params, retain_graph=True)
    else:
        def step():
            torch.autograd.grad(loss_of(*fn(*inputs)), params)
    return step


def shape_label(shape) -> str:
    name, b, k, l, d = shape
    return f"{name} B={b} K={k} L={l} d={d}"


def run(device: str = "cuda") -> list[dict]:
    return run_bench("retrieval", SHAPES, IMPLS, make_step, shape_label, device)
