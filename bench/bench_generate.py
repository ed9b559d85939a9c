"""Generation benchmark: transformers `generate` vs the spt_fast engine, same weights and prompts.

`pytest bench/bench_generate.py` (pytest-benchmark): a full greedy generation of NEW tokens for a
batch of synthetic contexts (each row its own prompt, mixed), on a tiny random Llama on CPU, and
on GPU the Llama-2-7B shapes with random weights (skipped without CUDA).
The latency table with TTFT, decode tokens/s and % of the HBM roofline is
`spt-fast bench generate` (spt_fast/benchmarks/generate.py: run_generate_bench).
"""
import pytest
import torch

from spt_fast.generation.engine import Engine
from spt_fast.kernels.inject import inject_prompts
from spt_fast.model.build import build_spt_model
from spt_fast.model.loading import random_preset_model
from spt_fast.model.spt import SPTConfig

K, L, CTX, NEW = 4, 8, 128, 32

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU generation benchmark needs CUDA")


def _setup(preset, dtype, device, compile=False):
    base = random_preset_model(preset, dtype, device)
    spt = build_spt_model(base, SPTConfig(num_prompts=K, prompt_len=L, layout="shared", init="vocab"))
    spt.to(device).eval()
    return base, spt, Engine(spt, None, compile=compile)


def _calls(base, spt, engine, batch, device):
    vocab = base.config.vocab_size
    ids = torch.randint(min(100, vocab - 1), vocab, (batch, CTX), generator=torch.Generator().manual_seed(batch))
    ids[:, 0] = 1
    picks = [b % K for b in range(batch)]

    def hf():
        with torch.no_grad():
            emb = base.get_input_embeddings()(ids.to(device))
            at = spt.prompt_positions(torch.full((batch,), CTX, device=device))
            rows = inject_prompts(emb, spt.prompts.weight.to(emb.dtype), torch.arange(batch, device=device),
                                  torch.tensor(picks, device=device), at)
            mask = torch.ones(batch, CTX + L, dtype=torch.long, device=device)
            base.generate(inputs_embeds=rows, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, pad_token_id=0)

    def ours():
        engine.generate_ids(ids.tolist(), [0] * batch, max_new_tokens=NEW, stops=(), ignore_eos=True, prompt=picks)

    def synced(fn):
        def run():
            fn()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
        return run

    return {"hf": synced(hf), "spt_fast": synced(ours)}


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("impl", ["hf", "spt_fast"])
def test_generate_tiny_cpu(benchmark, impl, batch):
    calls = _calls(*_setup("tiny", torch.float32, "cpu"), batch, "cpu")
    benchmark.group = f"generate-tiny-cpu-b{batch}"
    benchmark.pedantic(calls[impl], rounds=5, warmup_rounds=1)


@needs_cuda
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("impl", ["hf", "spt_fast", "spt_fast-compiled"])
def test_generate_llama2_7b_gpu(benchmark, impl, batch):
    calls = _calls(*_setup("llama-2-7b", torch.bfloat16, "cuda", compile=impl.endswith("compiled")), batch, "cuda")
    benchmark.group = f"generate-llama2-7b-bf16-b{batch}"
    benchmark.pedantic(calls[impl.split("-")[0]], rounds=3, warmup_rounds=2)


if __name__ == "__main__":
    from spt_fast.benchmarks.generate import format_rows, run_generate_bench

    model = "preset:llama-2-7b" if torch.cuda.is_available() else "default"
    print(format_rows(run_generate_bench(model, dtype="bf16" if torch.cuda.is_available() else "fp32")))
