"""NF4 kernels on the Llama-2-7B layer shapes (GPU): GB/s of the decode matmul and the prefill
dequantize, against bitsandbytes' own kernels and a dense bf16 matmul, with a tile sweep.

Every timed call cycles through 6 copies of the weights (one 7B layer's group is 8-45 MB, the H100's
L2 is 50 MB: reusing one copy would time the cache). Bytes counted: the 4-bit weights plus their
block scales, read once per call. The sweep picks, per path (M = 1 gemv, M = 16 dot), the tiles
with the least total time over one layer's four groups; `--write FILE` saves them in the format
that SPT_FAST_NF4_TILES reads (kernels/nf4.py).
Usage: python bench/bench_nf4.py [--quick] [--write tiles.json]
"""
import argparse
import itertools
import json

import torch
from torch import nn

from spt_fast.kernels import nf4
from spt_fast.model.quant import to_nf4

SHAPES = {"qkv": ([4096, 4096, 4096], 4096), "o": ([4096], 4096), "gate_up": ([11008, 11008], 4096),
          "down": ([4096], 11008)}
COPIES = 6
SWEEP = {1: [dict(block_n=bn, block_k=bk, num_warps=w) for bn, bk, w in
             itertools.product((8, 16, 32), (256, 512, 1024), (4, 8))],
         16: [dict(block_n=bn, num_warps=w) for bn, w in itertools.product((32, 64, 128), (4, 8))]}


def make(sizes, k, seed):
    layers = []
    for i, n in enumerate(sizes):
        lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        lin.weight.data.normal_(0, 0.02, generator=torch.Generator("cuda").manual_seed(seed * 7 + i))
        layers.append(to_nf4(lin, torch.bfloat16, 64))
    return layers, nf4.group_from_bnb(layers, torch.bfloat16)


def bench(fn_of_copy):
    from triton.testing import do_bench

    it = itertools.cycle(range(COPIES))
    return do_bench(lambda: fn_of_copy(next(it)), warmup=30, rep=120, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="defaults only, no sweep")
    ap.add_argument("--write", default=None, help="save the best tiles here (JSON for SPT_FAST_NF4_TILES)")
    a = ap.parse_args()
    rows, totals = [], {m: [0.0] * len(SWEEP[m]) for m in SWEEP}
    for name, (sizes, k) in SHAPES.items():
        copies = [make(sizes, k, s) for s in range(COPIES)]
        groups = [g for _, g in copies]
        nbytes = sum(s.packed.numel() + s.absmax.numel() * s.absmax.element_size() for s in groups[0].segments)
        dense = [torch.randn(sum(sizes), k, device="cuda", dtype=torch.bfloat16) for _ in range(COPIES)]
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = nf4.nf4_matmul_ref(x.float(), groups[0])
            rel = ((nf4.nf4_matmul(x, groups[0]).float() - ref.float()).norm() / ref.float().norm()).item()
            with torch.no_grad():
                t_bnb = bench(lambda c: [layer(x) for layer in copies[c][0]])
            t_dense = bench(lambda c: torch.nn.functional.linear(x, dense[c]))
            t_ours = bench(lambda c: nf4.nf4_matmul(x, groups[c]))
            best = ("default", t_ours)
            if not a.quick:
                for i, cfg in enumerate(SWEEP[m]):
                    t = bench(lambda c: nf4.nf4_matmul_triton(x, groups[c], **cfg))
                    totals[m][i] += t
                    if t < best[1]:
                        best = (cfg, t)
            rows.append(f"{name:8s} M={m:2d} ours {nbytes / t_ours / 1e6:5.0f} GB/s ({t_ours * 1e3:6.1f} us, "
                        f"rel err {rel:.1e}) best {best[0]} {nbytes / best[1] / 1e6:5.0f} GB/s | bitsandbytes "
                        f"{nbytes / t_bnb / 1e6:5.0f} GB/s ({t_bnb * 1e3:6.1f} us) | dense bf16 "
                        f"{dense[0].numel() * 2 / t_dense / 1e6:5.0f} GB/s ({t_dense * 1e3:6.1f} us)")
            print(rows[-1], flush=True)
        t_deq = bench(lambda c: nf4.nf4_dequantize(groups[c]))
        t_bdeq = bench(lambda c: [__import__("bitsandbytes").functional.dequantize_4bit(
            m_.weight.data, m_.weight.quant_state) for m_ in copies[c][0]])
        written = sum(sizes) * k * 2
        rows.append(f"{name:8s} dequantize ours {t_deq * 1e3:7.1f} us ({(nbytes + written) / t_deq / 1e6:5.0f} GB/s"
                    f" read+written) | bitsandbytes {t_bdeq * 1e3:7.1f} us")
        print(rows[-1], flush=True)
        del copies, groups, dense
        torch.cuda.empty_cache()
    print("\n".join(["", "summary:"] + rows))
    if not a.quick:
        best = {}
        for m, key in ((1, "gemv"), (16, "dot")):
            i = min(range(len(SWEEP[m])), key=lambda j: totals[m][j])
            best[key] = SWEEP[m][i]
            print(f"best {key} tiles over one layer: {SWEEP[m][i]} ({totals[m][i] * 1e3:.1f} us per layer)")
        if a.write:
            with open(a.write, "w") as f:
                json.dump(best, f)


if __name__ == "__main__":
    main()
