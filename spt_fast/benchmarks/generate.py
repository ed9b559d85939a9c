"""Generation latency: transformers `generate` vs the spt_fast engine, same weights, same prompts.

Every row is a synthetic context of `context_len` token ids followed by its soft prompt (shared
layout); row b uses prompt b % K, so a batch mixes prompts. Both implementations get exactly the
same input embeddings and decode greedily for exactly `new_tokens` tokens (eos and stop strings
off). Each repeat times every implementation in turn (an untimed 1-token call, a 1-token call,
then a full one). Reported per (impl, batch):
- ttft_ms: a 1-token call, from token ids to the first new token (embedding, prompt injection,
  prefill, first token), the best repeat;
- step_ms: one decode step, the median over repeats: for the engines (time(new_tokens) -
  time(1)) / (new_tokens - 1) of the repeat's own pair of calls; for transformers on a CPU, from
  its first new token to its last inside the full call (its streamer hook), as its prefill alone
  varies by more than its steps take; decode_tokens_per_s: batch / step;
- roofline_pct: (weight bytes / step time) / read bandwidth, the share of the memory-bound limit a
  decode step reaches (gpt-fast's "achieved bandwidth"), and achieved_GBps. On a CPU the bandwidth
  is read right before each repeat's timing of each implementation, and the share is the median
  over repeats of that repeat's step against its own reading (a shared VM's memory speed moves by
  1.5x between phases of one run: one reading at the start put steps at 62% or 135% of it);
  read_GBps: the median reading. On a GPU the bandwidth is the --bandwidth given.
Models: "default" (the embedded SmolLM2-135M), a local folder, or "preset:NAME" (a Llama preset
from spt_fast.model.llama.PRESETS with random weights built on the device: nothing is downloaded).
"""
from __future__ import annotations

import functools
import statistics
import time
import warnings

import torch

from ..errors import SPTError
from ..model.loading import PRESET_PREFIX
from ..utils import cpu_info
from .timing import bandwidth_probe

H100_SXM_BANDWIDTH = 3.35e12  # bytes/s
IMPLS = ("hf", "spt_fast", "spt_fast-int8", "spt_fast-int4", "spt_fast-w8a8")


def _weight_bytes(model) -> int:
    """Bytes of weights one decode step must read: every parameter and buffer (NF4 block scales
    included) except the input embedding table, of which a step reads one row per sequence (a
    tied table is the LM head too, so it counts)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    seen, total = set() if tied else {emb.data_ptr()}, 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit: the block scales
        while state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            state = getattr(state, "state2", None)
    return total


def engine_weight_bytes(engine, base) -> int:
    """Bytes one decode step of this engine reads: its quantized or packed projections where it has
    them (one copy each), else the base's weights (the input embedding: one row per token, left out)."""
    from ..model.cpu_projections import CPUProjection, QuantProjection, W8A8Projection

    llama = getattr(engine.backend, "llama", None)
    if llama is None or not engine.cpu_projections:
        return _weight_bytes(base)
    total = 0
    for m in llama.modules():
        if isinstance(m, (QuantProjection, W8A8Projection)):
            total += m.read_bytes()
        elif isinstance(m, CPUProjection):
            total += sum(w.numel() * w.element_size() for w in m.weights())
    norms = [p for n, p in llama.named_parameters() if n.endswith("norm.weight")]
    return total + sum(p.numel() * p.element_size() for p in norms)


class _TokenClock:
    """A streamer for transformers' `generate` (put / end: all it calls) used as a clock: when each
    step's tokens came out (on a CPU, where a step is done when they do)."""

    def __init__(self, timer):
        self.timer, self.times = timer, []

    def put(self, value):
        self.times.append(self.timer())

    def end(self):
        pass


def _timed(fn, device, clock) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t


def run_generate_bench(model: str = "default", impls=("hf", "spt_fast"), batch_sizes=(1, 16), dtype="fp32",
                       load_4bit: bool = False, context_len: int = 128, new_tokens: int = 32, device=None,
                       num_prompts: int = 4, prompt_len: int = 8, repeats: int = 3, compile: bool | str = "auto",
                       bandwidth: float = H100_SXM_BANDWIDTH, seed: int = 0, clock: str = "wall") -> list[dict]:
    """Rows {"impl","model","device","dtype","batch","ttft_ms","decode_tokens_per_s","step_ms",...}.

    clock="process" times CPU runs by the process's CPU time instead of wall time: with one torch
    thread that is the work done, unaffected by other jobs taking the cores (a shared machine).
    compile: the engines' decode-step mode ("auto", as `generate`/`chat`/`eval` run: compiled on CPU
    from the second call of a shape on; the bench makes that call before timing).
    """
    from ..generation.engine import Engine
    from ..kernels.inject import inject_prompts
    from ..model.build import build_spt_model
    from ..model.llama import LlamaConfig
    from ..model.loading import load_any
    from ..model.spt import SPTConfig
    from ..utils import dtype_name, resolve_dtype

    for impl in impls:
        if impl not in IMPLS:
            raise SPTError(f"unknown impl {impl!r}: use some of {', '.join(IMPLS)}")
    if new_tokens < 2:
        raise SPTError("new_tokens must be >= 2 (decode speed needs more than the first token)")
    if context_len < 2:
        raise SPTError("context_len must be >= 2")
    if clock not in ("wall", "process"):
        raise SPTError(f"clock must be 'wall' or 'process', got {clock!r}")
    tdtype, dname = resolve_dtype(dtype), dtype_name(dtype)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model.startswith(PRESET_PREFIX) and device.type == "cpu":
        try:
            p = LlamaConfig.from_name(model[len(PRESET_PREFIX):])
        except ValueError as exc:
            raise SPTError(str(exc)) from None
        if p.dim * p.n_layers > 576 * 30:
            raise SPTError(f"{model} is a GPU benchmark (random weights of that size do not fit this CPU run); "
                           "use preset:tiny, preset:smollm2-135m or 'default' on CPU")
    if clock == "process" and device.type == "cuda":
        raise SPTError("clock='process' is for CPU runs; GPU work does not show in the process's CPU time")
    timer = time.process_time if clock == "process" else time.perf_counter
    base, tok = load_any(model, tdtype, load_4bit, device)
    spt = build_spt_model(base, SPTConfig(num_prompts=num_prompts, prompt_len=prompt_len, layout="shared",
                                          init="vocab", seed=seed))
    spt.to(device).eval()
    hf_base = base
    if "hf" in impls and "spt_fast" in impls and device.type == "cpu":
        # The engine may re-lay CPU weights out in place (column-major, where its packed projections
        # do not apply); transformers gets its own
        # untouched copy, as a user of `generate` would have it.
        import copy

        hf_base = copy.deepcopy(base)
    engines = {impl: Engine(spt, tok, compile=compile, weights=impl.split("-")[1] if "-" in impl else None)
               for impl in impls if impl.startswith("spt_fast")}
    weight_bytes = {impl: engine_weight_bytes(e, base) for impl, e in engines.items()}
    weight_bytes["hf"] = _weight_bytes(base)
    cpu = cpu_info()["model"]
    probe = bandwidth_probe() if device.type == "cpu" else (lambda: bandwidth)
    vocab = base.get_input_embeddings().weight.shape[0]
    bos = getattr(base.config, "bos_token_id", None)
    pad = (tok.pad_token_id if tok is not None else None) or 0
    rows_out = []
    for B in batch_sizes:
        g = torch.Generator().manual_seed(seed + B)
        ids = torch.randint(min(100, vocab - 1), vocab, (B, context_len), generator=g)
        if bos is not None:
            ids[:, 0] = bos
        picks = [b % num_prompts for b in range(B)]

        def hf_call(n, ids=ids, picks=picks, B=B, streamer=None):
            with torch.no_grad():
                emb = hf_base.get_input_embeddings()(ids.to(device))
                at = spt.prompt_positions(torch.full((B,), context_len, device=device))  # synthetic: no tag
                rows = inject_prompts(emb, spt.prompts.weight.to(emb.dtype), torch.arange(B, device=device),
                                      torch.tensor(picks, device=device), at)
                mask = torch.ones(B, context_len + prompt_len, dtype=torch.long, device=device)
                return hf_base.generate(inputs_embeds=rows, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=pad, streamer=streamer)

        def ours_call(n, engine, ids=ids, picks=picks):
            return engine.generate_ids(ids.tolist(), [0] * len(picks), max_new_tokens=n, stops=(), ignore_eos=True,
                                       prompt=picks)

        calls = {"hf": hf_call, **{impl: functools.partial(ours_call, engine=e) for impl, e in engines.items()}}
        for impl in impls:
            calls[impl](new_tokens)  # warm-up (and compilation)
            if impl in engines:  # compile="auto" on CPU: the second call of a kind compiles it
                calls[impl](new_tokens)
            calls[impl](1)
        # Implementations alternate inside each repeat, and the best repeat counts: on a shared
        # machine, load that comes and goes then hits every implementation alike.
        t1 = {impl: [] for impl in impls}
        tn = {impl: [] for impl in impls}
        bw = {impl: [] for impl in impls}
        clocked = {impl: [] for impl in impls}  # steps timed inside the full call, where that can be
        for _ in range(repeats):
            for impl in impls:
                # An untimed call first: the first call after another implementation's ran up to
                # 1.4 s slower (transformers, 16 rows; its full call right after it did not).
                calls[impl](1)
                bw[impl].append(probe())
                t1[impl].append(_timed(lambda: calls[impl](1), device, timer))
                if impl == "hf" and device.type == "cpu":
                    # transformers' 16-row prefill alone moved by 1.5 s between calls (its 31 steps
                    # take ~1.7), so its steps are timed by its streamer hook within the call:
                    # first new token to last.
                    tokens_out = _TokenClock(timer)
                    tn[impl].append(_timed(lambda: calls[impl](new_tokens, streamer=tokens_out), device, timer))
                    clocked[impl].append((tokens_out.times[-1] - tokens_out.times[-new_tokens]) / (new_tokens - 1))
                else:
                    tn[impl].append(_timed(lambda: calls[impl](new_tokens), device, timer))
        for impl in impls:
            # A repeat's step: its own two calls' difference (the best 1-token call against the best
            # full one paired calls from different phases of this VM's speed: once a 16-row
            # transformers step came out below zero); the median over repeats.
            steps = clocked[impl] or [(t - f) / (new_tokens - 1) for f, t in zip(t1[impl], tn[impl])]
            step = statistics.median(steps)
            measured = step > 0
            if not measured:  # (tiny shapes: a few steps of a tiny model are within the noise)
                warnings.warn(f"bench generate: {impl} at batch {B}: a {new_tokens}-token call took no longer than "
                              "a 1-token one (the machine's speed moved); its step is not reported: run it again, "
                              "or with more --repeats or --new-tokens", stacklevel=2)
            first = min(t1[impl])
            shares = [weight_bytes[impl] / max(st, 1e-9) / b for st, b in zip(steps, bw[impl])]
            row = {"impl": impl, "model": model, "device": device.type, "dtype": dname, "batch": B,
                   "ttft_ms": round(first * 1e3, 3), "decode_tokens_per_s": round(B / step, 2) if measured else None,
                   "step_ms": round(step * 1e3, 3) if measured else None, "context_len": context_len,
                   "new_tokens": new_tokens, "load_4bit": bool(load_4bit),
                   "compile": str(engines[impl].compile) if impl in engines else "",
                   "threads": torch.get_num_threads(), "clock": clock, "weight_bytes": weight_bytes[impl],
                   "achieved_GBps": round(weight_bytes[impl] / step / 1e9, 1) if measured else None,
                   "roofline_pct": round(100 * statistics.median(shares), 1) if measured else None,
                   "read_GBps": round(statistics.median(bw[impl]) / 1e9, 1)}
            if device.type == "cuda":
                row["gpu"] = torch.cuda.get_device_name(device)
            else:
                row["cpu"] = cpu
            rows_out.append(row)
    return rows_out


def format_rows(rows: list[dict]) -> str:
    cols = ["impl", "batch", "ttft_ms", "decode_tokens_per_s", "step_ms", "achieved_GBps", "read_GBps",
            "roofline_pct"]
    where = rows[0].get("gpu") or rows[0].get("cpu", "") if rows else ""
    lines = [f"{where} (read_GBps: the memory's read speed beside each row's timings, the roofline)"] if rows else []
    lines.append("  ".join(f"{c:>20}" for c in cols))
    for r in rows:
        lines.append("  ".join(f"{str(r.get(c, '')):>20}" for c in cols))
    base = {(r["batch"]): r for r in rows if r["impl"] == "hf"}
    for r in rows:
        if r["impl"].startswith("spt_fast") and r["batch"] in base:
            h = base[r["batch"]]
            decode = (f"{r['decode_tokens_per_s'] / h['decode_tokens_per_s']:.2f}x"
                      if r["decode_tokens_per_s"] and h["decode_tokens_per_s"] else "(not measured)")
            lines.append(f"{r['impl']} batch {r['batch']}: decode {decode} transformers generate, "
                         f"ttft {h['ttft_ms'] / r['ttft_ms']:.2f}x")
    return "\n".join(lines)
