"""Training-step benchmark on a tiny random Llama (runs anywhere, CPU included):
straightforward (DESIGN §2) vs our prefix layout vs our shared layout, same batch.

`pytest bench/bench_train.py` (pytest-benchmark). The real comparison on SmolLM2-135M or the
Llama-2 shapes is `spt-fast bench train` (spt_fast/benchmarks/train.py), which isolates each impl in its
own process so its peak memory is its own.
"""
import pytest
import torch

from spt_fast.benchmarks.train import straightforward_loss, synthetic_batches
from spt_fast.model.build import build_spt_model
from spt_fast.model.spt import SPTConfig
from spt_fast.testing import tiny_llama

K, B, L, CTX, RESP, MAX_LEN = 4, 4, 8, 192, 24, 256


@pytest.fixture(scope="module")
def batch():
    return synthetic_batches(104, B, 1, CTX, RESP, bos=1)[0]


@pytest.mark.parametrize("impl", ["straightforward", "prefix", "shared"])
def test_train_step(benchmark, batch, impl):
    base = tiny_llama(hidden=128, layers=4, heads=4, kv_heads=2)
    layout = "prefix" if impl == "straightforward" else impl
    spt = build_spt_model(base, SPTConfig(num_prompts=K, prompt_len=L, layout=layout, max_len=MAX_LEN))
    if impl == "straightforward":
        base.gradient_checkpointing_enable()
        base.train()

    def step():
        spt.zero_grad(set_to_none=True)
        loss = straightforward_loss(spt, batch, MAX_LEN) if impl == "straightforward" else spt(batch)["loss"]
        loss.backward()
        return float(loss)

    loss = benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    assert torch.isfinite(torch.tensor(loss))
