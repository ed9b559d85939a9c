"""Continuous batching without HTTP: rows that join and leave at different steps (an earlier row
finishing while later ones decode, so the last row moves into its slot) reply exactly what the
engine replies for each conversation alone; a bad request fails alone."""
import threading

import torch

from spt_fast.generation.engine import Engine
from spt_fast.generation.scheduler import Job, Scheduler
from spt_fast.model.build import build_spt_model
from spt_fast.model.spt import SPTConfig
from spt_fast.testing import tiny_llama

CONVS = [([f"i like {w}."], [f"hello {w}", "how are you?"]) for w in ("cats", "dogs", "tea", "rain", "jazz", "art")]


def run_jobs(scheduler, engine, specs):
    done, lock, finished = {}, threading.Lock(), threading.Event()

    def on(i):
        def event(kind, value):
            if kind in ("done", "error"):
                with lock:
                    done[i] = (kind, value)
                    if len(done) == len(specs):
                        finished.set()
        return event

    ids, tags, _ = engine.encode([c for c, _ in specs])
    for i, ((conv, opts), context, tag) in enumerate(zip(specs, ids, tags)):
        assert scheduler.submit(Job(context, tag, engine.options(**opts), on(i)))
    assert finished.wait(120)
    return [done[i] for i in range(len(specs))]


def test_rows_leaving_out_of_order_keep_every_reply_exact(char_tok):
    torch.manual_seed(0)
    spt = build_spt_model(tiny_llama(init_std=0.1), SPTConfig(num_prompts=3, prompt_len=2, layout="shared",
                                                             init="random"))
    engine = Engine(spt, char_tok)
    scheduler = Scheduler(engine, max_batch=4, max_new_tokens=40).start()
    try:
        # Short ones first: rows 0/1 finish while rows 2/3 decode, then rows 4/5 join late.
        lengths = [3, 5, 30, 25, 12, 20]
        specs = [(c, dict(max_new_tokens=n, stops=(), ignore_eos=True, prompt=i % 3))
                 for i, (c, n) in enumerate(zip(CONVS, lengths))]
        results = run_jobs(scheduler, engine, specs)
        for (conv, opts), (kind, reply) in zip(specs, results):
            assert kind == "done"
            want = engine.generate([conv], **opts)[0]
            assert reply.tokens == want.tokens and reply.text == want.text and reply.prompt == want.prompt
        # One request that cannot fit fails alone; the others still reply.
        bad = (CONVS[0], dict(max_new_tokens=40, stops=()))
        huge = Job([1] * 5000, 0, engine.options(max_new_tokens=4), lambda *a: None)
        errors = []
        huge.on_event = lambda kind, value: errors.append(kind)
        scheduler.submit(huge)
        results = run_jobs(scheduler, engine, [bad])
        assert results[0][0] == "done"
        assert errors == ["error"]
    finally:
        scheduler.stop()



def submit_one(scheduler, engine, conv, opts):
    """Run one conversation through the scheduler: (its job, (kind, value) of its last event)."""
    out, got = {}, threading.Event()

    def on(kind, value):
        if kind in ("done", "error"):
            out["r"] = (kind, value)
            got.set()
    ids, tags, _ = engine.encode([conv])
    job = Job(ids[0], tags[0], engine.options(**opts), on)
    assert scheduler.submit(job) and got.wait(120)
    return job, out["r"]


def test_context_is_cached_even_when_the_row_ends_at_its_first_token(char_tok):
    # The context's K/V are copied into the cache after the first token goes out: a reply that ends
    # right there (max_new_tokens=1) must still leave its context for the next turn.
    torch.manual_seed(0)
    spt = build_spt_model(tiny_llama(init_std=0.1), SPTConfig(num_prompts=3, prompt_len=2, layout="shared",
                                                             init="random"))
    engine = Engine(spt, char_tok)
    persona, history = CONVS[1]
    later = (persona, [*history, "fine, and you?", "good"])
    opts = {"stops": (), "ignore_eos": True, "prompt": 1}
    for budget, expect_hit in ((64 << 20, True), (0, False)):
        scheduler = Scheduler(engine, max_batch=2, max_new_tokens=16, cache_bytes=budget).start()
        try:
            _, (kind, reply) = submit_one(scheduler, engine, (persona, history), {**opts, "max_new_tokens": 1})
            assert kind == "done" and len(reply.tokens) == 1
            assert len(scheduler.context_cache) == (1 if expect_hit else 0)
            job, (kind, reply) = submit_one(scheduler, engine, later, {**opts, "max_new_tokens": 8})
            assert (job.cached_tokens > 0) == expect_hit
            want = engine.generate([later], max_new_tokens=8, **opts)[0]
            assert kind == "done" and reply.tokens == want.tokens
        finally:
            scheduler.stop()


def test_warm_up_leaves_no_trace(char_tok):
    # The server runs one request before its port opens: nothing of it may stay behind (no row, no
    # cached context, no step in the metrics), and the stop table it built serves the first client.
    torch.manual_seed(0)
    spt = build_spt_model(tiny_llama(init_std=0.1), SPTConfig(num_prompts=3, prompt_len=2, layout="shared",
                                                             init="random"))
    engine = Engine(spt, char_tok)
    steps = []
    scheduler = Scheduler(engine, max_batch=2, max_new_tokens=16, on_step=steps.append)
    scheduler.warm_up()
    assert scheduler.active == [] and len(scheduler.context_cache) == 0 and steps == []
    assert engine._stop_tables  # the default stops' table is built
    scheduler.start()
    try:
        conv = CONVS[0]
        _, (kind, reply) = submit_one(scheduler, engine, conv, {"max_new_tokens": 8})
        want = engine.generate([conv], max_new_tokens=8)[0]
        assert kind == "done" and reply.tokens == want.tokens and steps
    finally:
        scheduler.stop()


def test_after_step_runs_once_a_pass_after_that_passs_events(char_tok):
    """The hook a buffering caller (the server's mailbox) sends by: it runs after every pass, with
    every event of that pass already reported and none of the next, before a joining row's context
    copy (its first token must not wait for it), and once more when the loop ends."""
    import time

    torch.manual_seed(0)
    spt = build_spt_model(tiny_llama(init_std=0.1), SPTConfig(num_prompts=2, prompt_len=2, layout="shared"))
    engine = Engine(spt, char_tok)
    log, passes = [], []
    scheduler = Scheduler(engine, max_batch=1, max_new_tokens=8, on_step=lambda n: log.append(("step", n)),
                          after_step=lambda: passes.append(len(log))).start()
    put = scheduler.context_cache.put
    seen_at_put = []

    def logged_put(*args):  # what the hook had sent when the joining row's context was copied
        seen_at_put.append(list(passes))
        put(*args)

    scheduler.context_cache.put = logged_put
    ids, tags, _ = engine.encode([CONVS[0]])
    try:
        scheduler.submit(Job(ids[0], tags[0], engine.options(max_new_tokens=5, stops=(), ignore_eos=True),
                             lambda kind, value: log.append((kind, value))))
        limit = time.monotonic() + 60
        while not any(k == "done" for k, _ in log) and time.monotonic() < limit:
            time.sleep(0.01)
        steps = [i for i, (k, _) in enumerate(log) if k == "step"]
        assert len(steps) == 5  # the joining pass and four decode steps
        for nxt in steps[1:] + [len(log)]:
            assert nxt in passes  # a hook ran once everything before the next pass was out
        # The first token went out before the (slow) copy of the context into the context cache.
        first = next(i for i, (k, _) in enumerate(log) if k == "text")
        assert len(seen_at_put) == 1 and seen_at_put[0] and seen_at_put[0][-1] > first
    finally:
        scheduler.stop()
    assert passes[-1] == len(log)
