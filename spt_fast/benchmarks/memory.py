"""`spt-fast bench memory`: what one SPT training step on a 4-bit base needs, measured and estimated.

Each layout runs in its own process (peak memory is per process). The base is built in NF4 one
layer at a time (model.loading.random_preset_model), then one warm-up and one timed SPT step run
(all four losses). Memory is split by measuring before and after each part:
- weights: building the base;
- trainable: the prompts and the retriever with their gradients and AdamW moments;
- activations: the peak of the first step above what was held before it.
On CPU the figures are the process's resident memory (peak: getrusage's max RSS); on CUDA
torch.cuda's allocated bytes. `estimate()` computes the same three parts from the shapes alone,
so other models and batches can be sized without running them (README gives the formula).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import torch

from ..errors import SPTError

GIB = 2 ** 30


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Meter:
    """Current and peak memory on the device (CUDA allocator) or of the process (RSS). On CPU the
    peak of a stretch of work is sampled every few milliseconds by a thread (getrusage's max RSS
    covers the process's whole life, not one part of it)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._top, self._sampling = 0, None

    def now(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _rss()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        import threading

        self._top = _rss()
        stop = threading.Event()

        def sample():
            while not stop.wait(0.002):
                self._top = max(self._top, _rss())
        self._sampling = (stop, threading.Thread(target=sample, daemon=True))
        self._sampling[1].start()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._sampling is not None:
            self._sampling[0].set()
            self._sampling[1].join()
            self._sampling = None
        return max(self._top, _rss())


def estimate(preset: str, layout: str, K: int, B: int, context_len: int, response_len: int, prompt_len: int,
             dtype_bytes: int = 2, tag_len: int = 2, checkpointing: bool = False) -> dict:
    """Bytes of each part of an SPT step on an NF4 base of a preset shape, from shapes alone.

    weights: every linear but the LM head in NF4 with double quantization: half a byte per weight,
    plus one byte of block scale per 64 weights and a 4-byte second-level scale per 256 blocks;
    embeddings, LM head and norms in the compute dtype.
    trainable: prompts (K·L·d) and the retriever (d² + d), fp32, times 4 (value, gradient, two
    AdamW moments).
    activations: what autograd keeps per token and layer, (4·d + 4·i)·dtype (q and the attention
    output, the norms' outputs, the MLP's gate, up and activations; an NF4 projection keeps no
    input, having no weight gradient — fitted on 2- and 4-layer 7B-width runs), plus per layer the
    attention's keys/values, plus the fused head: its rows and their gradients in fp32
    (3·(K+1)·B·R·d·4) and one vocabulary chunk of logits (≤ 64 MiB).
    shared: the context's K/V for every layer (B·Tc·2·d_kv per layer) is kept through the step; the
    K·B branches run Tb = L + tag + response − 1 tokens; attention keys/values per layer are the
    context once per sample plus every branch's own (2·B·(Tc + K·Tb)·d_kv), and twice that while
    the layer's backward runs. With checkpointing the branches keep each layer's input only
    (d·dtype per token and layer) plus one layer's full terms while it is recomputed. The context
    pass itself peaks at the K/V plus one layer's temporaries (B·Tc·(d + 3·i)·dtype and the
    attention scores, B·H·Tc²·4); with K=1 that can pass the branches' part.
    Every phase also holds one dequantized projection (bitsandbytes dequantizes per call: d·i·dtype).
    prefix: the per-token terms for K·B whole sequences (L + context + response), no shared cache.
    """
    from ..model.llama import LlamaConfig

    c = LlamaConfig.from_name(preset)
    d, i, n, v = c.dim, c.intermediate_size, c.n_layers, c.vocab_size
    d_kv = c.n_kv_heads * c.head_dim
    per_layer_linear = d * d + 2 * d * d_kv + d * d + 3 * d * i
    quantized = n * per_layer_linear
    nf4 = quantized * (0.5 + 1 / 64 + 4 / (64 * 256))
    dense = (v * d * (1 if c.tie_embeddings else 2) + (2 * n + 1) * d) * dtype_bytes
    weights = nf4 + dense
    trainable = 4 * 4 * (K * prompt_len * d + d * d + d)
    per_token_layer = (4 * d + 4 * i) * dtype_bytes
    head = 3 * (K + 1) * B * response_len * d * 4 + 64 * 2 ** 20
    if layout == "shared":
        context_kv = B * context_len * 2 * d_kv * n * dtype_bytes
        tb = prompt_len + tag_len + response_len - 1
        branch_tokens = K * B * tb
        attn_kv = 2 * B * (context_len + K * tb) * d_kv * dtype_bytes
        if checkpointing:
            kept = branch_tokens * (n * d * dtype_bytes + per_token_layer) + 2 * attn_kv
        else:
            kept = n * (branch_tokens * per_token_layer + attn_kv) + attn_kv
        context_pass = B * context_len * (d + 3 * i) * dtype_bytes + B * c.n_heads * context_len ** 2 * 4
        activations = context_kv + max(kept + head, context_pass) + d * i * dtype_bytes
    else:
        tokens = K * B * (prompt_len + context_len + response_len)
        activations = tokens * n * (per_token_layer + 2 * d_kv * dtype_bytes) + head + d * i * dtype_bytes
    return {"weights": int(weights), "trainable": int(trainable), "activations": int(activations),
            "total": int(weights + trainable + activations)}


def measure_step(preset: str, layout: str, K: int, B: int, context_len: int, response_len: int, prompt_len: int,
                 dtype: str = "bf16", device: str | None = None, checkpointing: bool = False) -> dict:
    """One layout in this process: build in NF4, one warm-up and one timed step; the memory split."""
    from ..model.build import build_spt_model
    from ..model.loading import random_preset_model
    from ..model.spt import SPTConfig
    from ..utils import bound_heap_retention, resolve_dtype
    from .train import synthetic_batches

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        bound_heap_retention()  # as `train --load-4bit` does on CPU
    meter = Meter(dev)
    torch.manual_seed(0)
    before = meter.now()
    t0 = time.perf_counter()
    base = random_preset_model(preset, resolve_dtype(dtype), dev, load_4bit=True)
    build_s = time.perf_counter() - t0
    weights = meter.now() - before
    held = meter.now()
    spt = build_spt_model(base, SPTConfig(num_prompts=K, prompt_len=prompt_len, layout=layout,
                                          max_len=prompt_len + context_len + response_len + 8))
    spt.to(dev)
    spt.set_activation_checkpointing(checkpointing)
    trainable = [p for p in spt.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    for p in trainable:  # the optimizer's moments, allocated now (a zero step changes nothing)
        p.grad = torch.zeros_like(p)
    opt.step()
    trainable_bytes = meter.now() - held
    batches = synthetic_batches(base.config.vocab_size, B, 2, context_len, response_len, 1)
    # Every sample its own persona, so the contrastive loss has pairs of both labels' kind.
    for b in batches:
        b.persona_keys = [f"persona {j}" for j in range(B)]

    def step(batch):
        opt.zero_grad(set_to_none=False)
        spt(batch.to(dev))["loss"].backward()
        opt.step()

    held = meter.now()
    meter.reset_peak()
    step(batches[0])
    step_peak = meter.peak()
    activations = step_peak - held
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(batches[1])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else max(_peak_rss(), step_peak, meter.now())
    est = estimate(preset, layout, K, B, context_len, response_len, prompt_len, torch.finfo(resolve_dtype(dtype)).bits // 8,
                   checkpointing=checkpointing)
    return {"model": f"preset:{preset}", "layout": layout, "device": str(dev), "dtype": f"{dtype}+nf4", "K": K,
            "activation_checkpointing": checkpointing,
            "batch": B, "context_len": context_len, "response_len": response_len, "prompt_len": prompt_len,
            "build_s": round(build_s, 1), "step_s": round(step_s, 4),
            # baseline + weights + trainable + activations = the first step's peak (step_peak);
            # peak: the whole process's (CPU: max RSS; CUDA: max allocated).
            "measured": {"baseline": before, "weights": weights, "trainable": trainable_bytes,
                         "activations": activations, "step_peak": step_peak, "peak": peak},
            "estimated": est, "peak_gib": round(peak / GIB, 2),
            "baseline": "process RSS (torch and libraries included)" if dev.type == "cpu" else "CUDA allocated"}


def run_memory_bench(presets=("llama-2-7b",), layouts=("shared", "prefix"), Ks=(4,), B=8, context_len=256,
                     response_len=32, prompt_len=1, dtype="bf16", device=None, timeout_s: float = 7200,
                     checkpointing: bool = False) -> list[dict]:
    if checkpointing and "prefix" in layouts:
        raise SPTError("--activation-checkpointing is built for the shared layout: add --layout shared")
    bad = [k for k in Ks if k < 1]
    if bad:
        raise SPTError(f"--num-prompts must be at least 1, got {bad[0]}")
    rows = []
    for preset, layout, K in ((p, lay, k) for p in presets for lay in layouts for k in Ks):
        kw = dict(preset=preset, layout=layout, K=K, B=B, context_len=context_len, response_len=response_len,
                  prompt_len=prompt_len, dtype=dtype, device=device, checkpointing=checkpointing)
        code = f"import json; from {__name__} import measure_step; print(json.dumps(measure_step(**{kw!r})))"
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "TQDM_DISABLE": "1"})
        except subprocess.TimeoutExpired:
            raise SPTError(f"{preset} {layout} K={K}: the step did not finish within {timeout_s:.0f} s") from None
        if proc.returncode != 0:
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["(no output)"]
            raise SPTError(f"{preset} {layout} K={K}: failed: {tail[0]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        m, e = row["measured"], row["estimated"]
        print(f"{preset} {layout} K={K}: peak {m['peak'] / GIB:.2f} GiB (weights {m['weights'] / GIB:.2f} / est "
              f"{e['weights'] / GIB:.2f}, trainable {m['trainable'] / 2**20:.1f} / est {e['trainable'] / 2**20:.1f} "
              f"MiB, activations {m['activations'] / GIB:.2f} / est {e['activations'] / GIB:.2f} GiB), "
              f"step {row['step_s']:.1f} s on {row['device']}", flush=True)
    return rows
