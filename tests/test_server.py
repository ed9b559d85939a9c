"""`spt-fast serve` as a real process on 127.0.0.1, driven by real HTTP clients (httpx and the
official openai client): replies equal the offline engine's, streaming, mixed prompts in one batch,
context-cache reuse across turns, seeds, every bad-input class, disconnects, queue overflow and
a clean shutdown. Every wait is bounded; the server is stopped whatever happens."""
import concurrent.futures as futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")

from spt_fast import testing  # noqa: E402
from spt_fast.generation.engine import Engine  # noqa: E402
from spt_fast.model.build import build_spt_model  # noqa: E402
from spt_fast.model.spt import SPTConfig  # noqa: E402
from spt_fast.training import checkpoint  # noqa: E402

PERSONA = "i like cats."
EOS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_base(seed=8):
    """A tiny random Llama with peaked logits (no near-ties for greedy) that rarely ends a reply."""
    from transformers import LlamaForCausalLM

    cfg = testing.tiny_llama().config.to_dict()
    cfg.update(initializer_range=0.1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(type(testing.tiny_llama().config)(**cfg)).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS] = 0.0
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    base = tiny_base()
    base.save_pretrained(root / "model")
    testing.char_tokenizer().save_pretrained(root / "model")
    spt = build_spt_model(base, SPTConfig(num_prompts=3, prompt_len=2, layout="shared", init="random"))
    cfg = {"model": str(root / "model"), "spt": spt.config.to_dict(), "hidden_size": 64, "train": {"dtype": "fp32"},
           "placement": "[context][P][ R:][response]"}
    return checkpoint.save(root / "run", 1, spt.trainable_state_dict(), cfg)


@pytest.fixture(scope="module")
def offline(ckpt):
    return Engine.from_checkpoint(ckpt, device="cpu", dtype="recorded")  # as serve loads it


def start_server(ckpt, *extra):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "spt_fast", "serve", "--checkpoint", str(ckpt), "--port", str(port),
                             "--device", "cpu", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not come up within 120 s")


def stop_server(proc, timeout=30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


@pytest.fixture(scope="module")
def server(ckpt):
    proc, url = start_server(ckpt, "--max-batch", "4", "--max-tokens", "64")
    try:
        yield url
    finally:
        stop_server(proc)


def chat(url, messages, timeout=60, **options):
    return httpx.post(url + "/v1/chat/completions", json={"messages": messages, **options}, timeout=timeout)


def conv(*turns, persona=PERSONA):
    msgs = [{"role": "system", "content": persona}] if persona else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return msgs


def test_reply_equals_the_offline_engine_and_carries_the_openai_fields(server, offline):
    r = chat(server, conv("hello there"), max_tokens=12)
    assert r.status_code == 200, r.text
    body = r.json()
    want = offline.generate([([PERSONA], ["hello there"])], max_new_tokens=12)[0]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["object"] == "chat.completion"
    assert body["spt"]["prompt"] == want.prompt and body["usage"]["completion_tokens"] == len(want.tokens)


def test_stream_pieces_join_to_the_reply(server, offline):
    with httpx.stream("POST", server + "/v1/chat/completions", timeout=60,
                      json={"messages": conv("how are you?"), "max_tokens": 16, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and "spt" in chunks[0]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert text == offline.generate([([PERSONA], ["how are you?"])], max_new_tokens=16)[0].text


def test_openai_client_plain_and_streamed(server, offline):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=60, max_retries=0)
    msgs = conv("what do you do?")
    got = client.chat.completions.create(model="spt", messages=msgs, max_tokens=10)
    want = offline.generate([([PERSONA], ["what do you do?"])], max_new_tokens=10)[0].text
    assert got.choices[0].message.content == want
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="spt", messages=msgs, max_tokens=10, stream=True)]
    assert "".join(pieces) == want


def test_concurrent_requests_with_different_prompts_batch_together(server, offline):
    jobs = [(k, f"message number {k}") for k in (0, 1, 2, 0, 2, 1)]
    with futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda j: chat(server, conv(j[1]), max_tokens=20, prompt=j[0]), jobs))
    for (k, text), r in zip(jobs, replies):
        assert r.status_code == 200 and r.json()["spt"]["prompt"] == k
        want = offline.generate([([PERSONA], [text])], max_new_tokens=20, prompt=k)[0].text
        assert r.json()["choices"][0]["message"]["content"] == want
    metrics = httpx.get(server + "/metrics", timeout=10).text
    assert "spt_requests_total" in metrics and "spt_time_to_first_token_seconds_bucket" in metrics


def test_next_turn_reuses_the_context_and_replies_the_same(server, offline):
    first = chat(server, conv("tell me about your cat", persona="i have a cat named tom."), max_tokens=8).json()
    reply = first["choices"][0]["message"]["content"]
    history = ["tell me about your cat", reply, "is it fluffy?"]
    second = chat(server, conv(*history, persona="i have a cat named tom."), max_tokens=8).json()
    assert second["spt"]["cached_tokens"] > 10  # the first turn's context was not computed again
    want = offline.generate([(["i have a cat named tom."], history)], max_new_tokens=8)[0].text
    assert second["choices"][0]["message"]["content"] == want


def test_a_seed_gives_the_same_text_alone_and_batched(server):
    opts = dict(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    alone = chat(server, conv("sing me something"), **opts).json()["choices"][0]["message"]["content"]
    with futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(chat, server, conv(f"noise {i}"), max_tokens=30, temperature=1.0) for i in range(3)]
        batched = pool.submit(chat, server, conv("sing me something"), **opts)
        assert batched.result().json()["choices"][0]["message"]["content"] == alone
        [o.result() for o in others]


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "malformed JSON"),
    ({"messages": []}, 400, "'messages'"),
    ({"messages": "hi"}, 400, "'messages'"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "content must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "last message"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "'max_tokens'"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "'max_tokens'"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "'temperature'"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "'n'"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "'tools'"),
    ({"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, 400, "bogus"),
    ({"messages": [{"role": "user", "content": "hi"}], "prompt": 7}, 400, "'prompt'"),
    ({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, "larger than"),
])
def test_bad_input_is_a_4xx_with_one_line(server, body, status, words):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server + "/v1/chat/completions", timeout=30, headers={"content-type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert words in message and "\n" not in message


def test_an_over_long_conversation_is_truncated_with_a_warning(server):
    r = chat(server, conv(*(["a long turn about many things"] * 41)), max_tokens=4)
    assert r.status_code == 200 and r.json()["spt"]["truncated"] and "warning" in r.json()["spt"]


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    with httpx.stream("POST", server + "/v1/chat/completions", timeout=60,
                      json={"messages": conv("go on and on"), "max_tokens": 64, "stream": True,
                            "stop": ["never-appears"]}) as r:
        next(r.iter_lines())  # the first event arrived: the row is decoding
    deadline = time.time() + 20
    while time.time() < deadline and httpx.get(server + "/health", timeout=5).json()["active"]:
        time.sleep(0.1)
    assert httpx.get(server + "/health", timeout=5).json()["active"] == 0


def test_queue_overflow_is_503_and_shutdown_is_clean(ckpt):
    proc, url = start_server(ckpt, "--max-batch", "1", "--max-queue", "1", "--max-tokens", "64")
    try:
        long = dict(max_tokens=64, stop=["never-appears"])
        with futures.ThreadPoolExecutor(6) as pool:
            codes = [f.result() for f in [pool.submit(lambda i: chat(url, conv(f"hi {i}"), **long), i)
                                          for i in range(6)]]
        statuses = sorted(r.status_code for r in codes)
        assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}
        busy = next(r for r in codes if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "try again" in busy.json()["error"]["message"]
        # SIGTERM while a request is in flight: it is answered, then the process ends by itself.
        with futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(chat, url, conv("last one"), **long)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            assert pending.result().status_code == 200
        assert proc.wait(30) == 0
    finally:
        stop_server(proc)


def test_bench_clients_run_every_conversation_once_and_reply_as_the_offline_engine(server, offline):
    # `spt-fast bench serve`'s load: 2 clients share 3 two-turn conversations, starting 0.2 s apart.
    from spt_fast.benchmarks.serve import load_level

    convs = [(["i like cats."], ["hi there", "what do you do?"]), (["i run a lot."], ["hello", "nice"]),
             (["i sing."], ["hey you", "ok then"])]
    row, results = load_level(server, 2, convs, 8, ramp_s=0.2)
    assert (row["requests"], row["failed"], row["conversations"], row["ramp_s"]) == (6, 0, 3, 0.2)
    assert sorted(r["persona"][0] for r in results) == sorted(c[0][0] for c in convs for _ in range(2))
    want = offline.generate([(r["persona"], r["history"]) for r in results], max_new_tokens=8)
    assert [r["text"] for r in results] == [w.text for w in want]
    # Each conversation's second turn resends the first: its context comes from the cache.
    assert all(r["cached"] > 0 for r in results if len(r["history"]) == 3)
