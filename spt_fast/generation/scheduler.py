"""Continuous batching: requests join the running batch at the next step and leave when done.

One thread owns the model. Each step decodes one token for every active row at its own position,
each row with its own soft prompt, sampling settings, seed and stop strings. A step that admits
waiting requests (into free rows of a static KV cache, after the part of their context that the
context cache holds where the layout allows, generation.context_cache) is one pass for all:
the active rows' next tokens and the new rows' prefills together (Llama.extend). A finished or cancelled
row frees its slot at once (the last active row moves into it, so active rows stay rows 0..n-1 of
the cache). Everything a request sees goes through its `on_event` callback, from this thread.

Token choice, stops and the reply text follow the engine (generation.engine) exactly, so a
greedy reply equals Engine.generate's for the same conversation.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import SPTError
from ..model.cpu_native import argmax_rows
from ..utils import round_up
from .context_cache import ContextCache
from .decoding import GenConfig, sample_next
from .engine import Engine, Reply
from .stops import TextDelta


@dataclass
class Job:
    """One request: ready context ids and options; the scheduler reports through on_event
    ("prompt", index), ("text", piece) and finally ("done", Reply) or ("error", message)."""
    ids: list[int]
    tag_len: int
    gen: GenConfig
    on_event: Callable[[str, object], None]
    truncated: bool = False
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    cached_tokens: int = 0
    # decoding state (scheduler thread only)
    prompt: int = -1
    pos: int = 0
    token: int = 0
    state: int = 0
    emitted: list = field(default_factory=list)
    generator: torch.Generator | None = None
    stops: object = None
    delta: TextDelta | None = None


def _greedy_picks(logits: torch.Tensor, jobs: list[Job]) -> list:
    """Each row's arg-max in one pass over the step's logits [rows, V] (one call a row cost ~30 us
    each on the CPU), where any of the rows decodes greedily; else None each."""
    if not any(job.gen.greedy for job in jobs):
        return [None] * len(jobs)
    return argmax_rows(logits).tolist()


@dataclass
class _Joining:
    """A job about to join the batch: its slot, the rows it still has to prefill (after `start`
    cached tokens, up to `total`), its prompt, and where its context's shareable part ends."""
    job: Job
    slot: int
    rows: torch.Tensor
    start: int
    total: int
    prompt: int
    at: int


class Scheduler:
    """Continuous batching over an Engine's compact Llama (see the module docstring)."""

    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 256, max_new_tokens: int = 256,
                 cache_bytes: int = 256 << 20, on_step: Callable[[int], None] | None = None,
                 after_step: Callable[[], None] | None = None):
        if not engine.fast:
            raise SPTError("continuous batching needs the compact Llama engine (a Llama-architecture base)")
        self.engine, self.llama = engine, engine.backend.llama
        self.max_batch, self.max_queue, self.max_new_tokens = max_batch, max_queue, max_new_tokens
        spt = engine.spt
        self.shares_context = spt.layout.shares_context
        need = spt.config.max_len + max_new_tokens + 1
        seq = min(round_up(need, 64), engine.max_positions)
        dtype = spt.base.get_input_embeddings().weight.dtype
        self.caches = self.llama.setup_caches(max_batch, seq, dtype, engine.device)
        self._views: dict[tuple[int, int], list] = {}  # (start, stop) -> views of those cache rows
        self.context_cache = ContextCache(cache_bytes) if self.shares_context else None
        self.active: list[Job] = []
        self.waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stop = False
        self.on_step = on_step
        # Called after each pass of the loop (and when it ends), once that pass's events are all
        # out, and before a joining row's context copy: a caller that buffers on_event calls
        # delivers them here in one go.
        self.after_step = after_step
        self._running, self._finished = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._loop, name="spt-scheduler", daemon=True)

    # ---- requests in --------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        """Run the loop in a thread of its own (see `run` for the calling thread)."""
        self.thread.start()
        return self

    def run(self) -> None:
        """Run the loop in the calling thread until `stop`. The server runs it in the process's main
        thread: on the 2-vCPU machines a decode step ran 1.3-2x slower in a second thread (PyTorch's
        OpenMP pool belongs to the thread that made it)."""
        self.thread = threading.current_thread()
        self._loop()

    @torch.no_grad()
    def warm_up(self, max_new_tokens: int = 4) -> None:
        """Run one short request through the model before the first client: the first request
        otherwise pays for what is built once (the token texts behind the default stop table,
        ~0.4 s on the embedded model's 49k tokens; the first calls into the model). Leaves no trace
        in the context cache or the metrics. Call it from the thread that will run the loop."""
        if self.engine.tokenizer is None:
            return
        ids, tags, _ = self.engine.encode([(["i like music."], ["hello, how are you?"])])
        job = Job(ids[0], tags[0], self.engine.options(max_new_tokens=max_new_tokens, ignore_eos=True),
                  lambda kind, value: None)
        context_cache, on_step = self.context_cache, self.on_step
        self.context_cache, self.on_step = None, None
        try:
            self._join([self._prepare(job, len(self.active))])
            while job in self.active:
                self._step()
        finally:
            self.context_cache, self.on_step = context_cache, on_step
            self.active = [j for j in self.active if j is not job]

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full or the scheduler is stopping (the caller says
        'try later')."""
        with self._wake:
            if self._stop or len(self.waiting) >= self.max_queue:
                return False
            self.waiting.append(job)
            self._wake.notify()
        return True

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish nothing more: cancel waiting and active jobs, end the thread."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._running.is_set() and self.thread is not threading.current_thread():
            self._finished.wait(timeout)  # (not a join: the loop may be the main thread's, see `run`)

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        self._running.set()
        try:
            self._serve()
        finally:
            self._finished.set()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.waiting and not self.active:
                    self._wake.wait()
                if self._stop:
                    break
                admit = []
                while self.waiting and len(self.active) + len(admit) < self.max_batch:
                    admit.append(self.waiting.popleft())
            joining = []
            try:
                self._drop_cancelled()  # first: the joining rows' slots follow the active rows
            except Exception as exc:
                self._fail_all(exc, admit)
                continue
            for job in admit:
                if job.cancelled:
                    continue
                try:
                    joining.append(self._prepare(job, len(self.active) + len(joining)))
                except Exception as exc:  # this request alone fails; the batch goes on
                    self._report(job, "error", f"generation failed: {type(exc).__name__}: {exc}")
            try:
                if joining:
                    self._join(joining)
                elif self.active:
                    self._step()
            except Exception as exc:
                self._fail_all(exc, [j.job for j in joining])
            self._after_step()
        for job in list(self.waiting) + self.active:
            self._report(job, "error", "the server is shutting down")
        self.waiting.clear()
        self.active = []
        self._after_step()

    def _after_step(self) -> None:
        if self.after_step is not None:
            try:
                self.after_step()
            except Exception:  # (as _report: a failing listener must not stop the loop)
                pass

    def _fail_all(self, exc: Exception, others: list[Job]) -> None:
        """Never leave a request hanging: fail every job in flight (and `others` not yet in it)."""
        for job in self.active + [j for j in others if j not in self.active]:
            self._report(job, "error", f"generation failed: {type(exc).__name__}: {exc}")
        self.active = []

    def _report(self, job: Job, kind: str, value) -> None:
        try:
            job.on_event(kind, value)
        except Exception:  # a caller that went away must not stop the others
            pass

    @torch.no_grad()
    def _prepare(self, job: Job, slot: int) -> "_Joining":
        """A job's prompt-injected rows, with the cached part of its context already in its slot."""
        eng = self.engine
        rows, lengths, idx = eng.prepare([job.ids], [job.tag_len], job.gen)
        total = int(lengths[0])
        if total + job.gen.max_new_tokens > self.caches[0].seq_len:
            raise SPTError(f"{total} context and prompt tokens + max_tokens={job.gen.max_new_tokens} do not fit "
                           f"the server's {self.caches[0].seq_len} positions")
        start, at = 0, 0
        if self.context_cache is not None:
            at = int(eng.spt.prompt_positions(torch.tensor([len(job.ids)]), torch.tensor([job.tag_len]))[0])
            start, kv = self.context_cache.longest_prefix(job.ids[:at])
            if kv is not None:
                for i, c in enumerate(self.caches):
                    c.k_cache[slot, :, :start] = kv[0][i]
                    c.v_cache[slot, :, :start] = kv[1][i]
        return _Joining(job, slot, rows[0, start:total], start, total, int(idx[0]), at)

    @torch.no_grad()
    def _join(self, joining: list["_Joining"]) -> None:
        """One pass: every active row's next token and every joining row's prefill (Llama.extend)."""
        eng, n = self.engine, len(self.active)
        if self.on_step is not None:
            self.on_step(n + len(joining))
        tokens = torch.tensor([j.token for j in self.active], dtype=torch.long, device=eng.device)
        pieces = list(self.llama.tok_embeddings(tokens).split(1)) if n else []
        hidden = self.llama.extend(pieces + [j.rows for j in joining], [j.pos for j in self.active] +
                                   [j.start for j in joining], self.caches)
        logits = self.llama.logits(hidden).float()
        decoding = list(self.active)
        for job in decoding:  # every row's new K/V is in its cache: advance all before any row moves
            job.pos += 1
        for j in joining:
            job = j.job
            job.cached_tokens, job.prompt, job.pos = j.start, j.prompt, j.total
            if not job.gen.greedy:
                job.generator = torch.Generator(device=eng.device)
                job.generator.seed() if job.gen.seed is None else job.generator.manual_seed(job.gen.seed)
            job.stops = eng.stop_table(job.gen.stops)
            job.delta = TextDelta(job.gen.stops)
            self.active.append(job)
            self._report(job, "prompt", job.prompt)
        # Joining rows first: each copies its context's K/V into the context cache once its first
        # token is out (the copy is work a client need not wait for), and before any row finishes
        # and moves another into its slot.
        best = _greedy_picks(logits, decoding + [j.job for j in joining])
        for j, row, pick in zip(joining, logits[n:], best[n:]):
            self._take(j.job, row, pick, then=self._keeper(j))
        for job, row, pick in zip(decoding, logits[:n], best[:n]):
            self._take(job, row, pick)
        self._drop_cancelled()

    def _keeper(self, j: "_Joining") -> Callable[[], None] | None:
        caches = self._rows(j.slot, j.slot + 1)
        if self.context_cache is None or j.at <= j.start or not self.context_cache.fits(j.at, caches):
            return None

        def keep():  # (stack makes the copies the cache keeps)
            k = torch.stack([c.k_cache[0, :, :j.at] for c in caches])
            v = torch.stack([c.v_cache[0, :, :j.at] for c in caches])
            self.context_cache.put(j.job.ids[:j.at], k, v)
        return keep

    def _rows(self, start: int, stop: int) -> list:
        """Views of cache rows start..stop-1, made once each (a view is a KVCache module: making 30
        of them cost ~1 ms, a tenth of a 16-row step's Python)."""
        views = self._views.get((start, stop))
        if views is None:
            views = self._views[(start, stop)] = [c.rows(start, stop) for c in self.caches]
        return views

    def _step(self) -> None:
        n = len(self.active)
        if self.on_step is not None:
            self.on_step(n)
        device = self.engine.device
        tokens = torch.tensor([j.token for j in self.active], device=device)
        pos = torch.tensor([j.pos for j in self.active], device=device)
        kv_len = round_up(int(pos.max()) + 1, 16)
        with torch.no_grad():
            logits = self.llama.decode_one_token(tokens, pos, self._rows(0, n), kv_len)
        rows = list(self.active)
        for job in rows:  # every row's new K/V is in its cache: advance all before any row moves
            job.pos += 1
        best = _greedy_picks(logits, rows)
        for job, row, pick in zip(rows, logits, best):
            self._take(job, row, pick)
        self._drop_cancelled()

    def _take(self, job: Job, logits: torch.Tensor, greedy_pick: int,
              then: Callable[[], None] | None = None) -> None:
        """Choose this row's next token (greedy_pick: its arg-max, from _greedy_picks); emit text;
        run `then` (work that needs the row's cache but not before the token is out); finish the
        row on eos, a stop or its limit."""
        gen, eng = job.gen, self.engine
        if gen.greedy:
            token = greedy_pick
        else:
            noise = torch.empty_like(logits).exponential_(generator=job.generator)[None]
            token = int(sample_next(logits[None], gen.temperature, gen.top_p, noise)[0])
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        job.token = token
        finish = None
        if token == eng.eos_id and not gen.ignore_eos:
            finish = "eos"
        else:
            job.emitted.append(token)
            if job.stops is not None:
                job.state = int(job.stops.table[job.state, token])
                if job.state == job.stops.STOP:
                    finish = "stop"
            if finish is None and len(job.emitted) >= gen.max_new_tokens:
                finish = "length"
            piece = job.delta.update(eng.decode_text(job.emitted))
            if piece:
                self._report(job, "text", piece)
        if then is not None:
            self._after_step()  # the token goes out before the slow part (a context copy)
            then()
        if finish is not None:
            reply = eng.reply_of(job.emitted, finish, gen.stops, job.prompt, job.truncated)
            piece = job.delta.finish(reply.text)
            if piece:
                self._report(job, "text", piece)
            self._finish(job, reply)

    def _finish(self, job: Job, reply: Reply | None) -> None:
        i = self.active.index(job)
        last = len(self.active) - 1
        if i != last:  # keep the active rows packed at the top of the cache
            moved = self.active[last]
            for c in self.caches:
                c.k_cache[i, :, :moved.pos] = c.k_cache[last, :, :moved.pos]
                c.v_cache[i, :, :moved.pos] = c.v_cache[last, :, :moved.pos]
            self.active[i] = moved
        self.active.pop()
        if reply is not None:
            self._report(job, "done", reply)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.active if j.cancelled]:
            self._finish(job, None)
