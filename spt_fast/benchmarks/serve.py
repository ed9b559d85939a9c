"""`spt-fast bench serve`: the HTTP server under load from concurrent multi-turn clients.

The server runs as its own process on 127.0.0.1 (`spt-fast serve`), a fresh one per concurrency
level; the clients of a level share the same held-out conversations at every level, start spread
over `ramp` seconds, and replay them turn by turn on one connection each, resending the whole
history with the server's own earlier replies as chat clients do, streaming every reply. Per level:
requests/s, generated tokens/s, p50/p99 time to first token and total latency, the context
cache's hit rate, and how many requests failed or replied other than the offline engine's greedy
reply for the same conversation (must be 0). Then the context cache alone: the time to first
token of the last turn of a long conversation, with the cache and without.
"""
from __future__ import annotations

import concurrent.futures as futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import SPTError
from ..utils import dtype_name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m spt_fast serve ...` on a free port; stopped (SIGTERM, then kill) on exit."""

    def __init__(self, checkpoint, *flags: str, start_timeout: float = 300):
        import httpx

        port = _free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-m", "spt_fast", "serve", "--checkpoint", str(checkpoint),
                                      "--port", str(port), *flags], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise SPTError(f"the server exited: {self.proc.stderr.read()[-500:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise SPTError(f"the server did not start within {start_timeout:.0f} s")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def stream_chat(client, url: str, persona: list[str], history: list[str], max_tokens: int) -> dict:
    """One streamed request on an httpx.Client: its text, time to first token, latency, tokens and
    cached context."""
    messages = [{"role": "system", "content": " ".join(persona)}] if persona else []
    messages += [{"role": "user" if (len(history) - 1 - i) % 2 == 0 else "assistant", "content": h}
                 for i, h in enumerate(history)]
    t0 = time.perf_counter()
    first, text, info, finish = None, [], {}, None
    with client.stream("POST", url + "/v1/chat/completions", timeout=600,
                       json={"messages": messages, "max_tokens": max_tokens, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            info = event.get("spt", info)
            choice = event["choices"][0]
            piece = choice["delta"].get("content")
            if piece and first is None:
                first = time.perf_counter() - t0
            text.append(piece or "")
            finish = choice.get("finish_reason") or finish
    latency = time.perf_counter() - t0
    return {"text": "".join(text), "ttft": first if first is not None else latency, "latency": latency,
            "cached": info.get("cached_tokens", 0), "finish": finish}


def held_out_conversations(n: int, turns: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """(persona, user turns) of n held-out chit-chat conversations with at least `turns` turns."""
    import random

    from ..data.corpora import load_samples, split_by_dialog

    _, valid = split_by_dialog(load_samples("chitchat"))
    by_dialog: dict = {}
    for s in valid:  # the sample with the longest history holds the whole conversation
        if s.dialog_id not in by_dialog or len(s.history) > len(by_dialog[s.dialog_id].history):
            by_dialog[s.dialog_id] = s
    convs = []
    for s in by_dialog.values():
        lines = list(s.history) + [s.response]
        users = lines[0::2]  # the partner's turns; the server's replies come in between
        if len(users) >= turns:
            convs.append((list(s.persona), users[:turns]))
    random.Random(seed).shuffle(convs)
    if len(convs) < n:
        raise SPTError(f"only {len(convs)} held-out conversations have {turns} turns")
    return convs[:n]


def run_client(url: str, conv, max_tokens: int) -> list[dict]:
    """One conversation, turn by turn, on one client that keeps its connection (as chat clients
    and the openai package do; a new httpx client per request added ~40 ms to every TTFT here)."""
    import httpx

    persona, users = conv
    history, out = [], []
    with httpx.Client() as client:
        for user in users:
            history = history + [user]
            r = stream_chat(client, url, persona, history, max_tokens)
            r.update(persona=persona, history=list(history))
            out.append(r)
            if "error" in r:
                break
            history = history + [r["text"]]
    return out


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def load_level(url: str, clients: int, convs, max_tokens: int, ramp_s: float = 0.0) -> tuple[dict, list[dict]]:
    """`clients` closed-loop clients share the conversations (each takes the next one when its
    current conversation ends). Client i starts at i x ramp_s / clients: ramp_s = 0 is a burst of
    cold conversations at once, ramp_s = one turn's latency spreads the arrivals as a steady load
    does after the first turn."""
    import queue
    import threading

    todo: queue.SimpleQueue = queue.SimpleQueue()
    for c in convs:
        todo.put(c)
    results, lock = [], threading.Lock()

    def client(i: int) -> None:
        time.sleep(i * ramp_s / clients)
        while True:
            try:
                conv = todo.get_nowait()
            except queue.Empty:
                return
            rs = run_client(url, conv, max_tokens)
            with lock:
                results.extend(rs)

    t0 = time.perf_counter()
    with futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    return {"clients": clients, "conversations": len(convs), "ramp_s": ramp_s, "requests": len(results),
            "failed": len(results) - len(ok), "wall_s": wall,
            "requests_per_s": len(ok) / wall, "ttft_p50_s": _pct([r["ttft"] for r in ok], 0.5),
            "ttft_p99_s": _pct([r["ttft"] for r in ok], 0.99), "latency_p50_s": _pct([r["latency"] for r in ok], 0.5),
            "latency_p99_s": _pct([r["latency"] for r in ok], 0.99),
            "cache_hit_rate": sum(r["cached"] > 0 for r in ok) / max(len(ok), 1)}, results


def run_serve_bench(checkpoint: str | None = None, levels=(1, 4, 16, 64), turns: int = 4, max_tokens: int = 32,
                    long_turns: int = 8, device: str = "cpu", dtype: str | None = None, conversations: int = 64,
                    ramp: str | float = "auto", weights: str | None = None) -> dict:
    """Rows per concurrency level (each on a fresh server, so no level finds another's contexts in
    the cache), the context-cache figure, and the mismatch count. `ramp` is the seconds over which
    a level's clients start; "auto" is the one-client level's median request latency."""
    from ..generation.engine import Engine

    levels = sorted(levels)
    if ramp == "auto" and levels[0] != 1:
        raise SPTError("--ramp auto takes the one-client latency: put 1 in --levels or give --ramp in seconds")
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is None:
            checkpoint = _fresh_checkpoint(Path(tmp))
        offline = Engine.for_serving(checkpoint, device=device, dtype=dtype, weights=weights)  # as serve loads it
        rows, mismatches = [], 0
        dtype_flags = (("--dtype", dtype) if dtype else ()) + (("--weights", weights) if weights else ())
        for clients in levels:
            # The same conversations at every level (the first n of one draw): the same work, so the
            # levels' tokens/s compare (each level has a fresh server: no level finds another's contexts).
            convs = held_out_conversations(max(clients, conversations), turns, seed=0)
            ramp_s = 0.0 if clients == 1 else (rows[0]["latency_p50_s"] if ramp == "auto" else float(ramp))
            with ServerProcess(checkpoint, "--max-batch", "16", "--max-queue", "256", "--device", device,
                               *dtype_flags) as server:
                row, results = load_level(server.url, clients, convs, max_tokens, ramp_s)
            ok = [r for r in results if "error" not in r]
            # The offline engine's greedy replies: what every server reply must equal (and their length).
            want = offline.generate([(r["persona"], r["history"]) for r in ok], max_new_tokens=max_tokens)
            row["tokens"] = sum(len(w.tokens) for w in want)
            row["tokens_per_s"] = row["tokens"] / row["wall_s"]
            row["mismatches"] = sum(r["text"] != w.text for r, w in zip(ok, want))
            mismatches += row["mismatches"] + row["failed"]
            rows.append(row)
            print(f"{clients:>3} clients ({row['conversations']} conversations, starts over {ramp_s:.1f} s): "
                  f"{row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:.1f} tokens/s, "
                  f"TTFT p50 {row['ttft_p50_s'] * 1e3:.0f} ms p99 {row['ttft_p99_s'] * 1e3:.0f} ms, "
                  f"cache hits {row['cache_hit_rate']:.0%}, failed/mismatched {row['failed']}/{row['mismatches']}",
                  flush=True)
        cache = _cache_figure(checkpoint, long_turns, max_tokens, device, dtype_flags)
    return {"levels": rows, "context_cache": cache, "bad_replies": mismatches,
            "dtype": dtype_name(offline.spt.dtype), "weights": weights}


def _cache_figure(checkpoint, turns: int, max_tokens: int, device: str, dtype_flags=(), repeats: int = 3) -> dict:
    """TTFT of the last turn of one long conversation, with and without the context cache: the
    median of `repeats` runs, each on a fresh server (one run's figure moved by 2x between runs on
    a 2-vCPU VM)."""
    import statistics

    # A conversation whose last turn still fits the model's context: were its oldest turns dropped,
    # the context would start differently and no prefix cache could serve it. The user turns and
    # persona take at most 150 words; the replies add at most (turns - 1) x max_tokens tokens.
    candidates = held_out_conversations(20, turns, seed=7)
    fits = [c for c in candidates if sum(len(x.split()) for x in [*c[0], *c[1]]) <= 150]
    conv = (fits or candidates)[0]
    out = {}
    for name, cache_mb in (("with_cache", "256"), ("without_cache", "0")):
        ttfts = []
        for _ in range(max(1, repeats)):
            with ServerProcess(checkpoint, "--max-batch", "1", "--cache-mb", cache_mb, "--device", device,
                               *dtype_flags) as server:
                results = run_client(server.url, conv, max_tokens)
            last = results[-1]
            ttfts.append(last.get("ttft"))
        out[name] = {"ttft_s": statistics.median(ttfts), "ttft_runs_s": ttfts, "cached_tokens": last.get("cached"),
                     "context_words": sum(len(h.split()) for h in [*conv[0], *last.get("history", [])])}
    out["speedup"] = out["without_cache"]["ttft_s"] / out["with_cache"]["ttft_s"]
    print(f"turn {turns}: TTFT {out['with_cache']['ttft_s'] * 1e3:.0f} ms with the context cache, "
          f"{out['without_cache']['ttft_s'] * 1e3:.0f} ms without ({out['speedup']:.1f}x, medians of "
          f"{max(1, repeats)} runs; {out['with_cache']['context_words']} words of context, "
          f"{out['with_cache']['cached_tokens']} tokens from the cache)", flush=True)
    return out


def _fresh_checkpoint(folder: Path) -> Path:
    """An untrained SPT checkpoint on the embedded model (serving speed does not depend on training)."""
    import torch

    from ..model.build import build_spt_model
    from ..model.loading import load
    from ..model.spt import SPTConfig
    from ..training import checkpoint

    base, tok = load("default")
    # A fixed draw of the retriever's initial weights: the same checkpoint, so the same replies and
    # work, in every run (made afresh each run, the levels' replies came to 1,584-1,917 tokens).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        spt = build_spt_model(base, SPTConfig(num_prompts=4, prompt_len=8, layout="shared", max_len=512), tok)
    cfg = {"model": "default", "spt": spt.config.to_dict(), "hidden_size": spt.prompts.weight.shape[-1],
           "train": {"dtype": "fp32"}, "placement": "[context][P][ R:][response]"}
    return checkpoint.save(folder / "bench-checkpoint", 0, spt.trainable_state_dict(), cfg)


def summary_lines(result: dict) -> list[str]:
    rows = {r["clients"]: r for r in result["levels"]}
    lines = []
    if 1 in rows and 16 in rows:
        lines.append(f"16 clients: {rows[16]['tokens_per_s'] / rows[1]['tokens_per_s']:.1f}x the tokens/s of one; "
                     f"p99 TTFT {rows[16]['ttft_p99_s'] / rows[1]['ttft_p50_s']:.1f}x the one-client p50")
    lines.append(f"requests that failed or differ from the offline engine: {result['bad_replies']}")
    return lines

