"""Where a decode step's GPU time goes: random Llama-2-7B shape, NF4, engine (compiled), batch 1.

Prints the top CUDA kernels of 16 decode steps and the time of one step measured with events.
Usage (GPU): python bench/profile_decode.py [--model preset:llama-2-7b] [--no-4bit] [--batch 1]
"""
import argparse
import time

import torch

from spt_fast.generation.engine import Engine
from spt_fast.model.build import build_spt_model
from spt_fast.model.loading import load_any
from spt_fast.model.spt import SPTConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="preset:llama-2-7b")
    ap.add_argument("--no-4bit", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--eager", action="store_true")
    a = ap.parse_args()
    base, _ = load_any(a.model, torch.bfloat16, not a.no_4bit, "cuda")
    spt = build_spt_model(base, SPTConfig(num_prompts=4, prompt_len=8, layout="shared", init="vocab")).cuda().eval()
    eng = Engine(spt, None, compile=not a.eager)
    ids = torch.randint(100, 32000, (a.batch, 512)).tolist()
    kw = dict(stops=(), ignore_eos=True, prompt=[b % 4 for b in range(a.batch)])
    t = time.perf_counter()
    eng.generate_ids(ids, max_new_tokens=33, **kw)
    print(f"first call (compile) {time.perf_counter() - t:.1f} s")
    for n in (1, 33, 1, 33):
        torch.cuda.synchronize(); t = time.perf_counter()
        eng.generate_ids(ids, max_new_tokens=n, **kw)
        torch.cuda.synchronize(); print(f"max_new_tokens={n}: {1e3 * (time.perf_counter() - t):.2f} ms")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        eng.generate_ids(ids, max_new_tokens=17, **kw)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
