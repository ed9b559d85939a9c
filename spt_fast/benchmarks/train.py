"""Training-step benchmark: the straightforward approach (DESIGN §2) vs the engine's prefix and
shared layouts, same model, data, K and batch, each impl in its own process so peak memory is its own.

`spt-fast bench train --json FILE` writes one row per impl with impl, model, device, dtype, K,
batch, world, samples_per_s, tokens_per_s, peak_mem_bytes (plus the ratios against the others).
`--world-size N` also runs the prefix and shared impls data-parallel in N processes under
torchrun (gloo on CPU, nccl on GPUs), the same global batch split across them, as
`torchrun ... spt-fast train` does: the row tracks what the processes cost or gain.
Each impl repeats its timed batches (whole passes, `passes` in the row) until `min_seconds` have
passed, so a fast impl's figure is not a few seconds at the mercy of a shared machine's noise;
and with the straightforward baseline in the run, the other impls are timed before and after it
(`windows` = 2 in their rows, merged), so a drift of the machine's speed reaches all of them.
"""
import json
import os
import random
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from ..data.batch import Batch, collate
from ..errors import SPTError
from ..model import losses
from ..model.spt import SPTConfig, SPTModel

IMPLS = ("straightforward", "prefix", "shared")


# ---- the baseline, written the way DESIGN §2 describes it ------------------------------------
def straightforward_loss(spt: SPTModel, batch: Batch, max_len: int) -> torch.Tensor:
    """K sequential full passes (one per prompt), every row padded to max_len, fp32 logits over the
    whole vocabulary at every position, gradient checkpointing on; then the same four losses."""
    cfg = spt.config
    base = spt.base
    K, L, B = cfg.num_prompts, cfg.prompt_len, batch.input_ids.shape[0]
    dev = spt.device
    ids = torch.full((B, max_len), batch.input_ids[0, -1].item(), dtype=torch.long, device=dev)
    ids[:, : batch.input_ids.shape[1]] = batch.input_ids
    mask = torch.zeros(B, L + max_len, dtype=torch.long, device=dev)
    labels = torch.full((B, L + max_len), -100, dtype=torch.long, device=dev)
    for b in range(B):
        c, r = int(batch.ctx_len[b]), int(batch.resp_len[b])
        mask[b, : L + c + r] = 1
        labels[b, L + c : L + c + r] = batch.input_ids[b, c : c + r]
    emb = base.get_input_embeddings()(ids)
    all_logits, ce = [], []
    for k in range(K):
        x = torch.cat([spt.prompts.weight[k].to(emb.dtype)[None].expand(B, L, -1), emb], 1)
        logits = base(inputs_embeds=x, attention_mask=mask).logits.float()  # [B, L+max_len, V]
        z, y = logits[:, :-1], labels[:, 1:]
        per_tok = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="none").view(B, -1)
        ce.append(per_tok.sum(1))
        all_logits.append(z)
    seq = torch.stack(ce)  # [K, B]
    n = (labels[:, 1:] != -100).sum(1)
    scores = spt.scores(emb[:, :max_len], batch)[0] if cfg.uses_retriever else None
    parts = {"lm": losses.lm_loss(seq, n, weights=losses.routed_weights(scores, cfg.route))}
    if scores is not None:
        if cfg.use_fus:
            fused = sum(scores[:, k, None, None] * all_logits[k] for k in range(K))
            per = F.cross_entropy(fused.reshape(-1, fused.shape[-1]), labels[:, 1:].reshape(-1),
                                  reduction="none").view(B, -1).sum(1) / n
            parts["fus"] = per.mean()
        if cfg.use_sel:
            parts["sel"] = losses.selection_loss(seq / n[None], scores, cfg.tau_gold, cfg.tau_sim)
        if cfg.use_ctr:
            parts["ctr"] = losses.contrastive_loss(scores, spt.pair_labels(batch.persona_keys).to(dev))
    return losses.combine(parts, cfg.lambda_sel, cfg.lambda_ctr)


# ---- data --------------------------------------------------------------------------------------
def synthetic_batches(vocab: int, B: int, n: int, ctx_len: int, resp_len: int, bos: int | None, seed=0,
                      tag_len: int = 2):
    """Random token batches; each context's last `tag_len` tokens stand for the final " R:" tag
    (two tokens for byte-level BPE and Llama's SentencePiece), which the shared layout puts after
    the prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (B, ctx_len + resp_len), generator=g)
        if bos is not None:
            ids[:, 0] = bos
        out.append(Batch(ids, torch.full((B,), ctx_len), torch.full((B,), resp_len), ids[:, ctx_len:].clone(),
                         [f"p{i % 2}" for i in range(B)], [0] * B, bos is not None, torch.full((B,), tag_len)))
    return out


def real_batches(tok, data: str, B: int, n: int, max_len: int, prompt_len: int, seed=0):
    from ..data.corpora import load_samples
    from ..data.text import Encoder

    samples = load_samples(data)
    rng = random.Random(seed)
    enc = Encoder(tok, max_len, prompt_len)
    out = []
    while len(out) < n:
        encoded = [e for e in (enc.encode(s) for s in rng.sample(samples, 4 * B)) if e][:B]
        out.append(collate(encoded, tok.pad_token_id, tok.bos_token_id))
    return out


def part_of(batch: Batch, rank: int, world: int) -> Batch:
    """Rows rank·B/world .. (rank+1)·B/world of a global batch (a data-parallel process's part)."""
    per = batch.input_ids.shape[0] // world
    rows = slice(rank * per, (rank + 1) * per)
    return Batch(batch.input_ids[rows], batch.ctx_len[rows], batch.resp_len[rows], batch.targets[rows],
                 batch.persona_keys[rows], batch.turns[rows], batch.has_bos, batch.tag_len[rows])


# ---- one impl, in this process (or in each of torchrun's) -----------------------------------------
def measure(impl: str, model: str, K: int, B: int, steps: int, dtype: str, load_4bit: bool, max_len: int,
            data: str, context_len: int | None, response_len: int | None, prompt_len: int, device: str,
            min_seconds: float = 0.0) -> dict:
    from ..model.build import build_spt_model
    from ..model.loading import load_any
    from ..training.distributed import Distributed, data_parallel
    from ..utils import peak_memory_bytes, resolve_dtype

    dist = Distributed()  # torchrun's processes, or a world of one
    if dist.active:
        if impl == "straightforward":
            raise SPTError("the straightforward impl runs in one process only")
        device = str(dist.device)
    torch.manual_seed(0)
    base, tok = load_any(model, resolve_dtype(dtype), load_4bit, device)
    if context_len:
        batches = synthetic_batches(base.config.vocab_size, B, steps + 1, context_len, response_len or 32,
                                    getattr(base.config, "bos_token_id", None))
    else:
        batches = real_batches(tok, data, B, steps + 1, max_len, prompt_len)
    layout = "prefix" if impl == "straightforward" else impl
    cfg = SPTConfig(num_prompts=K, prompt_len=prompt_len, layout=layout, max_len=max_len)
    spt = build_spt_model(base, cfg)
    spt.to(device)
    if impl == "straightforward":
        base.gradient_checkpointing_enable()
        base.train()  # HF checkpointing only runs in training mode; these models have no dropout
        step = lambda b: straightforward_loss(spt, b, max_len)  # noqa: E731
    elif dist.active:
        forward = data_parallel(spt, dist)

        def step(b):
            shard = dist.shard(b.resp_len.sum().float().to(device), B, b.persona_keys)
            return forward(part_of(b, dist.rank, dist.world).to(device), shard)["loss"]
    else:
        step = lambda b: spt(b)["loss"]  # noqa: E731
    opt = torch.optim.AdamW([p for p in spt.parameters() if p.requires_grad], lr=1e-4)

    def one(b):
        opt.zero_grad(set_to_none=True)
        step(b.to(device)).backward()
        opt.step()

    one(batches[0])  # warm-up (allocator, lazy init)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    t0 = time.perf_counter()
    passes = 0
    while True:  # whole passes over the same batches until min_seconds (every process decides alike)
        for b in batches[1:]:
            one(b)
        passes += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if not dist.any(time.perf_counter() - t0 < min_seconds):
            break
    dist.barrier()
    dt = time.perf_counter() - t0
    tokens = passes * sum(int((b.ctx_len + b.resp_len).sum()) for b in batches[1:])
    peak = dist.sum(torch.tensor(float(peak_memory_bytes()), device=device))  # all processes together
    forward = None  # noqa: F841 (the DDP wrapper, held through this cell, goes before its process group)
    dist.close()
    return {"impl": impl, "model": model, "device": device, "dtype": dtype + ("+nf4" if load_4bit else ""),
            "K": K, "batch": B, "world": dist.world, "steps": steps, "max_len": max_len,
            "passes": passes, "windows": 1, "seconds": dt, "samples_per_s": passes * steps * B / dt,
            "tokens_per_s": tokens / dt,
            "peak_mem_bytes": int(peak.item())}


def _launch(kw: dict, world: int) -> subprocess.CompletedProcess:
    """measure(**kw) in a fresh process, or in `world` processes under torchrun."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if world == 1:
        code = f"import json; from {__name__} import measure; print(json.dumps(measure(**{kw!r})))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={world}", "-m", __name__, json.dumps(kw)],
                          capture_output=True, text=True, env=env)


def run_train_bench(model="default", impls=IMPLS, K=4, B=2, steps=3, dtype="fp32", load_4bit=False, max_len=512,
                    data="chitchat", context_len=None, response_len=None, prompt_len=8, device=None,
                    isolate=True, worlds=(1,), min_seconds=0.0) -> list[dict]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for world in worlds:
        if world < 1 or B % world:
            raise SPTError(f"--world-size {world}: needs a positive count that divides --batch-size {B}")
    for impl in impls:
        if impl not in IMPLS:
            raise SPTError(f"unknown impl {impl!r}; choose from {IMPLS}")
    rows = []
    for world in worlds:
        order = [i for i in impls if world == 1 or i != "straightforward"]  # DESIGN §2's baseline: one process
        if world == 1 and isolate and "straightforward" in order and len(order) > 1:
            # The fast impls are timed before and after the slow baseline, and their two windows
            # merged: a shared machine's speed drifts over minutes, and the ratios should not
            # depend on which impl ran in a slow phase.
            others = [i for i in order if i != "straightforward"]
            order = others + ["straightforward"] + others[::-1]
        measured = {}
        for impl in order:
            kw = dict(impl=impl, model=model, K=K, B=B, steps=steps, dtype=dtype, load_4bit=load_4bit,
                      max_len=max_len, data=data, context_len=context_len, response_len=response_len,
                      prompt_len=prompt_len, device=device, min_seconds=min_seconds)
            if impl == "straightforward" and load_4bit:
                kw["load_4bit"] = False  # DESIGN §2: the straightforward approach has no 4-bit
            label = (impl if world == 1 else f"{impl} x{world} processes") + (" (again)" if impl in measured else "")
            if isolate or world > 1:
                proc = _launch(kw, world)
                lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
                if proc.returncode != 0 or not lines:
                    tail = (proc.stderr or "").strip().splitlines()[-1:] or ["(no output)"]
                    measured[impl] = {**kw, "world": world, "error": tail[0]}
                    print(f"{label}: failed: {tail[0]}", file=sys.stderr, flush=True)
                    continue
                row = json.loads(lines[-1])
            else:
                row = measure(**kw)
            print(f"{label:>15}: {row['samples_per_s']:.3f} samples/s, {row['tokens_per_s']:.0f} tokens/s, "
                  f"peak {row['peak_mem_bytes'] / 2**30:.2f} GiB", flush=True)
            measured[impl] = _merge(measured[impl], row) if impl in measured else row
        rows += [measured[i] for i in impls if i in measured]
    one = {r["impl"]: r for r in rows if "error" not in r and r["world"] == 1}
    for r in rows:
        if "error" in r:
            continue
        for other, o in one.items():
            if other != r["impl"]:
                r[f"speedup_vs_{other}"] = r["samples_per_s"] / o["samples_per_s"]
        if r["world"] > 1 and r["impl"] in one:
            r["speedup_vs_one_process"] = r["samples_per_s"] / one[r["impl"]]["samples_per_s"]
    return rows


def _merge(first: dict, second: dict) -> dict:
    """One row from two timing windows of the same impl (a failed window fails the row)."""
    if "error" in first or "error" in second:
        return first if "error" in first else second
    seconds = first["seconds"] + second["seconds"]
    samples = first["samples_per_s"] * first["seconds"] + second["samples_per_s"] * second["seconds"]
    tokens = first["tokens_per_s"] * first["seconds"] + second["tokens_per_s"] * second["seconds"]
    return {**first, "passes": first["passes"] + second["passes"], "windows": first["windows"] + second["windows"],
            "seconds": seconds, "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
            "peak_mem_bytes": max(first["peak_mem_bytes"], second["peak_mem_bytes"])}


def _ratio(row: dict, other: str) -> str:
    """The row's speed-up against `other` ("1.00" against itself, "–" where it was not run)."""
    if other == row["impl"] and row["world"] == 1:
        return "1.00"
    value = row.get(f"speedup_vs_{other}")
    return "–" if value is None else f"{value:.2f}"


def format_rows(rows) -> str:
    head = ("| impl | processes | model | device | dtype | K | batch | samples/s | tokens/s | peak mem GiB | "
            "× straightforward | × prefix (1 process) | × one process |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        start = (f"| {r['impl']} | {r['world']} | {r['model']} | {r['device']} | {r['dtype']} | {r['K']} | "
                 f"{r.get('batch', r.get('B'))} | ")
        if "error" in r:
            lines.append(start + f"failed: {r['error']} | | | | | |")
        else:
            ratios = [_ratio(r, "straightforward"), _ratio(r, "prefix"),
                      _ratio(r, "one_process") if r["world"] > 1 else "1.00"]
            lines.append(start + f"{r['samples_per_s']:.3f} | {r['tokens_per_s']:.0f} | "
                         f"{r['peak_mem_bytes'] / 2**30:.2f} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # one torchrun process of a --world-size row: measure(**json); rank 0 prints
    result = measure(**json.loads(sys.argv[1]))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)
