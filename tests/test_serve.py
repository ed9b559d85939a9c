"""The generation engine (spt_fast.generation.engine) against the generic Hugging Face path
(spt_fast.generation.oracle): greedy replies equal token for token on tiny random Llamas (GQA and not, tied head,
ragged batches, both layouts, retrieved and mixed forced prompts), a 4-bit base, the non-Llama
fallback, and the real embedded model (slow). Then sampling, stop strings and early exit, the
max-new-tokens bound, streaming, bad input, the chat loop and the benchmark function."""
import io
import json
import os
import warnings

import pytest
import torch

from spt_fast import testing
from spt_fast.cli import build_parser
from spt_fast.training import checkpoint
from spt_fast.data.corpora import Sample
from spt_fast.generation.decoding import advance, sample_next
from spt_fast.generation.stops import StopTable, TextDelta
from spt_fast.model.build import build_spt_model
from spt_fast.errors import CheckpointError, SPTError
from spt_fast.generation.oracle import generate_batch
from spt_fast.model.llama import Llama
from spt_fast.generation.engine import Engine, compile_mode, use_persistent_compile_cache
from spt_fast.data.batch import collate
from spt_fast.model.spt import SPTConfig
from spt_fast.data.text import Encoder

# Ragged: contexts of very different lengths, one without persona, one without history.
CONVS = [
    (["i like cats."], ["hi there", "hello!", "how are you?"]),
    (["i drive a bus.", "i am tall."], ["hey"]),
    ([], ["a", "b", "c", "d", "what?"]),
    (["i sing."], []),
]
EOS = 2  # testing.char_tokenizer / tiny_llama


def tiny(seed=0, **overrides):
    """tiny_llama(init_std=0.1) (peaked logits: no near-ties for greedy), eos made unlikely so
    replies run long enough to compare, with config overrides (kv heads, tied head, layers)."""
    from transformers import LlamaForCausalLM

    base_cfg = testing.tiny_llama().config  # (tiny_llama seeds the generator itself: before ours)
    cfg = base_cfg.to_dict()
    cfg.update(initializer_range=0.1, **overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(type(base_cfg)(**cfg)).eval()
    with torch.no_grad():
        if not model.config.tie_word_embeddings:
            model.lm_head.weight[EOS] = 0.0
    return model.requires_grad_(False)


def spt_for(base, layout="shared", K=3, L=4, seed=0):
    return build_spt_model(base, SPTConfig(num_prompts=K, prompt_len=L, layout=layout, init="random", seed=seed))


def oracle(spt, tok, convs, max_new=24, stops=("\n", "Q:", "R:"), prompts=None):
    enc = Encoder(tok, spt.config.max_len, spt.config.prompt_len)
    encoded = [enc.encode(Sample(tuple(p), tuple(h), "", "t", 0), with_response=False) for p, h in convs]
    batch = collate(encoded, tok.pad_token_id, tok.bos_token_id)
    idx = None if prompts is None else torch.tensor(prompts)
    return generate_batch(spt, tok, batch, max_new, stops, prompt_idx=idx)


MODELS = {
    "gqa": dict(),
    "mha": dict(num_key_value_heads=4),
    "tied-1layer": dict(tie_word_embeddings=True, num_hidden_layers=1),
}


@pytest.mark.parametrize("layout", ["shared", "prefix"])
@pytest.mark.parametrize("model", list(MODELS))
def test_greedy_equals_hf_path(char_tok, model, layout):
    spt = spt_for(tiny(**MODELS[model]), layout)
    engine = Engine(spt, char_tok)
    assert engine.fast
    for prompts in (None, [2, 0, 1, 2]):
        for stops in ((), ("\n", "Q:", "R:")):
            ref, ref_prompts = oracle(spt, char_tok, CONVS, 24, stops, prompts)
            got = engine.generate(CONVS, max_new_tokens=24, stops=stops, prompt=prompts)
            assert [r.text for r in got] == ref
            assert engine.last_prompts == ref_prompts == [r.prompt for r in got]
            if not stops:
                assert [char_tok.decode(r.tokens, skip_special_tokens=True).strip() for r in got] == ref
    assert max(len(t) for t in ref) >= 8  # the comparison covered real decoding, not empty replies


def test_ragged_rows_equal_rows_alone(char_tok):
    engine = Engine(spt_for(tiny(seed=3)), char_tok)
    together = engine.generate(CONVS, max_new_tokens=20, stops=(), prompt=[0, 1, 2, 0])
    alone = [engine.generate([c], max_new_tokens=20, stops=(), prompt=p)[0] for c, p in zip(CONVS, [0, 1, 2, 0])]
    assert [r.tokens for r in together] == [r.tokens for r in alone]


def test_retrieval_picks_mixed_prompts_per_row(char_tok):
    # Mean-pooled char embeddings of these contexts are nearly equal; a retriever centred on
    # their mean (W x + b = W (x - c)) tells them apart, so the rows pick different prompts.
    from spt_fast.kernels.retrieval import pool_context

    spt = spt_for(tiny(seed=1), K=4)
    enc = Encoder(char_tok, spt.config.max_len, spt.config.prompt_len)
    batch = collate([enc.encode(Sample(tuple(p), tuple(h), "", "t", 0), with_response=False) for p, h in CONVS],
                    char_tok.pad_token_id, char_tok.bos_token_id)
    with torch.no_grad():
        centre = pool_context(spt.embed(batch.input_ids), batch.ctx_len, 1).mean(0)
        spt.retriever.proj.weight.copy_(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
        spt.retriever.proj.bias.copy_(-spt.retriever.proj.weight @ centre)
    engine = Engine(spt, char_tok)
    ref, ref_prompts = oracle(spt, char_tok, CONVS)
    assert engine.reply_batch(CONVS, max_new_tokens=24) == ref
    assert engine.last_prompts == ref_prompts and len(set(ref_prompts)) > 1


def test_kv_cache_decode_matches_full_forward():
    hf = tiny()
    model = Llama.from_hf(hf)
    g = torch.Generator().manual_seed(0)
    lengths = [7, 3, 5]
    x = torch.randn(3, 7, 64, generator=g)
    new = torch.randint(3, 100, (3, 4), generator=g)
    caches = model.setup_caches(3, 32, torch.float32)
    with torch.no_grad():
        model.prefill(x, caches)
        steps = [model.decode_one_token(new[:, t], torch.tensor(lengths) + t, caches) for t in range(4)]
        for b, n in enumerate(lengths):
            full = torch.cat([x[b, :n], model.tok_embeddings(new[b])])[None]
            ref = model.logits(model(full))[0, n:]
            for t in range(4):
                torch.testing.assert_close(steps[t][b], ref[t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,compile", [("cpu", False), pytest.param("cuda", False, marks=pytest.mark.gpu),
                                            pytest.param("cuda", True, marks=pytest.mark.gpu)])
def test_4bit_base_equals_hf_path(char_tok, device, compile):
    # On CUDA the engine computes the NF4 layers with the project's kernels (fp32 compute here, so
    # the same greedy tokens as bitsandbytes' layers in the HF path are expected).
    from spt_fast.model.quant import quantize_linear_layers

    base = quantize_linear_layers(tiny(seed=2).to(device), compute_dtype=torch.float32)
    spt = spt_for(base).to(device)
    engine = Engine(spt, char_tok, compile=compile)
    assert engine.fast and engine.nf4_kernels == (device == "cuda")
    ref, _ = oracle(spt, char_tok, CONVS, stops=(), prompts=[0, 1, 2, 1])
    assert engine.reply_batch(CONVS, max_new_tokens=24, stops=(), prompt=[0, 1, 2, 1]) == ref
    assert max(len(t) for t in ref) >= 8


def test_non_llama_falls_back_to_hf_path_with_one_warning(char_tok):
    spt = spt_for(testing.tiny_opt(), layout="prefix")
    with pytest.warns(UserWarning, match="falling back to the Hugging Face generation path") as record:
        engine = Engine(spt, char_tok)
    assert len(record) == 1 and not engine.fast
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = engine.reply_batch(CONVS, max_new_tokens=12)
        sampled = engine.reply_batch(CONVS, max_new_tokens=12, temperature=1.0, seed=0)
    assert got == oracle(spt, char_tok, CONVS, 12)[0]
    assert sampled == engine.reply_batch(CONVS, max_new_tokens=12, temperature=1.0, seed=0)


# --- sampling -------------------------------------------------------------------------------------

def test_sampling_reproducible_and_seed_dependent(char_tok):
    engine = Engine(spt_for(tiny(seed=4)), char_tok)
    kw = dict(max_new_tokens=20, stops=(), temperature=1.0, top_p=0.95)
    a = engine.generate(CONVS, seed=7, **kw)
    b = engine.generate(CONVS, seed=7, **kw)
    c = engine.generate(CONVS, seed=8, **kw)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]
    greedy = engine.generate(CONVS, max_new_tokens=20, stops=())
    assert [r.tokens for r in a] != [r.tokens for r in greedy]
    tiny_p = engine.generate(CONVS, max_new_tokens=20, stops=(), temperature=1.0, top_p=1e-6, seed=3)
    assert [r.tokens for r in tiny_p] == [r.tokens for r in greedy]


def test_sample_next_distribution_and_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    noise = torch.empty(20000, 4).exponential_(generator=g)
    freq = torch.bincount(sample_next(logits, 1.0, 1.0, noise), minlength=4).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    assert set(sample_next(logits, 1.0, 0.7, noise).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample_next(logits, 1.0, 0.5, noise).tolist()) == {0}  # the head alone reaches 0.5
    assert torch.equal(sample_next(logits[:3], 1.0, 1.0, None), torch.zeros(3, dtype=torch.long))


# --- stop strings, early exit, bound --------------------------------------------------------------

def test_stop_table_spans_tokens():
    pieces = ["a", "Q", ":", "Q:", "xQ", ":y", "R", "\n", "", "QR"]
    st = StopTable(pieces, ("\n", "Q:", "R:"))
    assert st.states == ["", "Q", "R"]

    def run(ids):
        s = 0
        for v in ids:
            s = int(st.table[s, v])
        return s

    assert run([0, 1, 2]) == st.STOP  # "a" "Q" ":" -> Q: across tokens
    assert run([4, 5]) == st.STOP  # "xQ" ":y"
    assert run([3]) == st.STOP and run([7]) == st.STOP
    assert run([1, 8, 2]) == st.STOP  # a skipped special token keeps the state
    assert run([9, 2]) == st.STOP  # "QR" ":" -> R:
    assert run([1, 0, 2]) == 0  # "Qa:" has no stop
    assert run([6]) == 2 and run([6, 0]) == 0


def naive_stop_table(pieces, stops):
    """The automaton by its definition: from each state's text, append the piece, look for a stop,
    else keep the longest tail that starts one."""
    states = [""] + sorted({s[:i] for s in stops for i in range(1, len(s))}, key=lambda p: (len(p), p))
    table = []
    for prefix in states:
        row = []
        for piece in pieces:
            text = prefix + piece
            if not piece:
                row.append(len(table))
            elif any(stop in text for stop in stops):
                row.append(len(states))
            else:
                row.append(max((i for i, p in enumerate(states) if text.endswith(p)), key=lambda i: len(states[i])))
        table.append(row)
    return states, table


def test_stop_table_equals_its_definition():
    import random

    rng = random.Random(0)
    chars = "abQR: \nxy"
    pieces = [""] + sorted({"".join(rng.choice(chars) for _ in range(rng.randint(1, 7))) for _ in range(3000)})
    stop_sets = [("\n", "Q:", "R:"), ("bye now", "Q:"), ("aba", "ab b", "\n"), ("x",), ("a a a",), ("ba", "ab")]
    for _ in range(30):  # random stop sets whose prefixes contain no stop (else a state is unreachable)
        stops = tuple({"".join(rng.choice(chars) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))})
        if not any(stop in s[:i] for s in stops for i in range(1, len(s)) for stop in stops):
            stop_sets.append(stops)
    for stops in stop_sets:
        st = StopTable(pieces, stops)
        states, table = naive_stop_table(pieces, stops)
        assert st.states == states, stops
        assert st.table[:-1].tolist() == table, stops
        assert st.table[-1].tolist() == [st.STOP] * len(pieces)


class Scripted:
    """A backend that emits fixed texts per row (char tokenizer ids), counting decode steps."""

    name = "scripted"

    def __init__(self, tok, texts, vocab=104):
        self.ids = [tok.encode(t, add_special_tokens=False) for t in texts]
        self.vocab, self.t, self.steps = vocab, 0, 0

    def batch_bucket(self, batch):
        return batch

    def _logits(self):
        out = torch.zeros(len(self.ids), self.vocab)
        for b, ids in enumerate(self.ids):
            out[b, ids[self.t] if self.t < len(ids) else EOS] = 10.0
        return out

    def prefill(self, rows, lengths, max_new_tokens):
        self.t = 0
        return self._logits()

    def step(self, token, pos, done, state, noise, *args, max_pos):
        self.t += 1
        self.steps += 1
        temperature, top_p, table, eos_id, ignore_eos = args
        return advance(self._logits(), done, state, eos_id, temperature, top_p, noise, table, ignore_eos)


def test_stop_strings_and_early_exit(char_tok):
    engine = Engine(spt_for(tiny()), char_tok)
    tail = " and then a long tail that goes on" * 2
    texts = ["hi Q: more" + tail, "ok fine\nnext" + tail, "abc R: x" + tail, "xyz"]  # row 3: then eos
    engine.backend = Scripted(char_tok, texts)
    got = engine.generate(CONVS, max_new_tokens=60)
    assert [r.text for r in got] == ["hi", "ok fine", "abc", "xyz"]
    assert [r.finish for r in got] == ["stop", "stop", "stop", "eos"]
    assert [len(r.tokens) for r in got] == [5, 8, 6, 3]  # up to the token that completes the stop
    assert engine.backend.steps == 7  # the last row finished at token 8: no step after it
    # Checking on the host only every 3 steps (as on GPU) gives the same replies, a few steps later.
    engine.backend = Scripted(char_tok, texts)
    assert engine.generate(CONVS, max_new_tokens=60, check_every=3) == got
    assert engine.backend.steps == 8  # finished seen at the check of step 9
    engine.backend = Scripted(char_tok, ["hello", "hey"])
    got = engine.generate(CONVS[:2], max_new_tokens=60)
    assert [(r.text, r.finish) for r in got] == [("hello", "eos"), ("hey", "eos")]
    assert engine.backend.steps == 5


def test_real_stop_string_cuts_the_reply(char_tok):
    engine = Engine(spt_for(tiny(seed=5)), char_tok)
    full = engine.generate(CONVS[:1], max_new_tokens=30, stops=())[0]
    pieces = [char_tok.decode([t], skip_special_tokens=True) for t in full.tokens]  # '' for specials
    # The stop: the first visible character from the 4th token on that no earlier token produced.
    at = next(i for i in range(3, len(pieces)) if pieces[i].strip() and pieces[i] not in "".join(pieces[:i]))
    cut = engine.generate(CONVS[:1], max_new_tokens=30, stops=(pieces[at],))[0]
    assert cut.finish == "stop" and cut.text == "".join(pieces[:at]).strip()
    assert cut.tokens == full.tokens[:at + 1]


def test_max_new_tokens_bounds_every_generation(char_tok):
    engine = Engine(spt_for(tiny(seed=6)), char_tok)
    for n in (1, 7):
        got = engine.generate(CONVS, max_new_tokens=n, stops=("never-occurs",), ignore_eos=True)
        assert all(len(r.tokens) == n and r.finish == "length" for r in got)
        got = engine.generate(CONVS, max_new_tokens=n, stops=("never-occurs",), temperature=2.0, seed=0)
        assert all(len(r.tokens) <= n for r in got)


# --- streaming --------------------------------------------------------------------------------------

@pytest.mark.parametrize("gen", [dict(), dict(stops=("w", "Q:")), dict(temperature=0.9, seed=2),
                                 dict(stops=(), max_new_tokens=40)])
def test_stream_equals_reply(char_tok, gen):
    engine = Engine(spt_for(tiny(seed=7)), char_tok)
    for conv in CONVS:
        pieces = list(engine.stream(*conv, **gen))
        assert "".join(pieces) == engine.reply(*conv, **gen)
    events = list(engine.stream_batch(CONVS, **gen))
    per_row = ["".join(p for b, p in events if b == row) for row in range(len(CONVS))]
    assert per_row == engine.reply_batch(CONVS, **gen)
    if not gen.get("stops", True):
        assert len(events) > len(CONVS)  # pieces arrive while decoding, not only at the end


def test_text_delta_holds_back_possible_stops():
    d = TextDelta(("\n", "Q:"))
    assert d.update(" hello Q") == "hello"
    assert d.update(" hello Qu") == " Qu"
    assert d.update(" hello Qu Q:") == ""
    assert d.finish("hello Qu") == ""


# --- bad input ----------------------------------------------------------------------------------------

def test_bad_input_is_a_clear_error(char_tok, tmp_path):
    spt = spt_for(tiny())
    spt.config.max_len = 60
    engine = Engine(spt, char_tok)
    assert isinstance(engine.reply(["i sing."], []), str)  # empty history: reply to the persona alone
    assert engine.reply(["i sing."], [], max_new_tokens=24) == oracle(spt, char_tok, [(["i sing."], [])])[0][0]
    with pytest.raises(SPTError, match="conversation 1: the persona alone takes"):
        engine.reply_batch([CONVS[0], (["a very long persona sentence " * 5], ["hi"])])
    with pytest.raises(SPTError, match="history must be a list"):
        engine.reply("i sing.", "hello")
    with pytest.raises(SPTError, match="needs .* positions"):
        engine.reply([], ["hi"], max_new_tokens=2000)
    for bad, match in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(top_p=0.0), "top_p"),
                       (dict(temperature=-1.0), "temperature"), (dict(prompt=3), "prompt must be"),
                       (dict(prompt=[0, 9]), "prompt must be"), (dict(beams=2), "unknown generation option")):
        with pytest.raises(SPTError, match=match):
            engine.reply([], ["hi"], **bad)
    with pytest.raises(SPTError, match="no conversations"):
        engine.reply_batch([])
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Engine.from_checkpoint(tmp_path / "missing")


# --- checkpoint, chat, benchmark ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = root / "model"
    base = tiny(seed=8)
    base.save_pretrained(model_dir)
    testing.char_tokenizer().save_pretrained(model_dir)
    spt = spt_for(base, K=3, L=2)
    cfg = {"model": str(model_dir), "spt": spt.config.to_dict(), "hidden_size": 64, "train": {"dtype": "fp32"},
           "placement": "[context][P][ R:][response]"}
    ck = checkpoint.save(root / "run", 1, spt.trainable_state_dict(), cfg)
    return ck, spt


def test_checkpoint_from_before_the_tag_placement_keeps_its_layout(saved, tmp_path, char_tok):
    # Written before 'shared' meant [context][P][ R:][response] (no "placement", no retriever
    # statistics): it is read with the placement and the retriever it was trained with.

    ck, spt = saved
    old = tmp_path / "old"
    cfg = json.loads((ck / checkpoint.CONFIG).read_text())
    del cfg["placement"]
    for key in ("retriever", "score_beta", "score_threshold"):
        del cfg["spt"][key]
    tensors = {k: v for k, v in spt.trainable_state_dict().items() if k not in ("retriever.center", "retriever.scale")}
    checkpoint.save(old, 1, tensors, cfg)
    loaded = Engine.from_checkpoint(old, device="cpu", dtype="fp32")
    assert loaded.config.layout == "shared-old" and loaded.config.retriever == "paper"
    want = build_spt_model(spt.base, spt.config.replace(layout="shared-old", retriever="paper"))
    want.load_trainable_state_dict(tensors)
    assert loaded.reply_batch(CONVS) == Engine(want, char_tok).reply_batch(CONVS)


def test_from_checkpoint_matches_in_memory_engine(saved, char_tok):
    ck, spt = saved
    loaded = Engine.from_checkpoint(ck, device="cpu", dtype="fp32")
    assert loaded.fast and loaded.config.num_prompts == 3
    assert loaded.reply_batch(CONVS) == Engine(spt, char_tok).reply_batch(CONVS)


def test_chat_with_fake_stdin(saved, char_tok):
    import argparse

    from spt_fast.cli import chat

    ck, spt = saved
    parser = argparse.ArgumentParser()
    chat.add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["chat", "--checkpoint", str(ck), "--persona", "i like tea.", "--max-new-tokens", "12"])
    stdin = io.StringIO("\n".join([
        "/persona i like tea. | i have a cat.", "hello there", "/prompt 1", "how are you?", "/history",
        "/prompt 9", "/prompt auto", "/bogus", "/reset", "/history", "/help", "bye", "/quit", "never read",
    ]) + "\n")
    out = io.StringIO()
    chat.run(args, stdin=stdin, stdout=out)
    text = out.getvalue()
    engine = Engine(spt, char_tok)
    persona = ["i like tea.", "i have a cat."]
    first = engine.reply(persona, ["hello there"], max_new_tokens=12)
    first_prompt = engine.last_prompts[0]
    second = engine.reply(persona, ["hello there", first, "how are you?"], max_new_tokens=12, prompt=1)
    assert f"bot [prompt {first_prompt}]> {first}\n" in text
    assert f"bot [prompt 1]> {second}\n" in text
    assert "  you: hello there" in text and f"  bot: {second}" in text
    assert "usage: /prompt K (0..2)" in text and "unknown command /bogus" in text
    assert "(conversation cleared)" in text and "  (empty)" in text and "/persona A | B | C" in text
    assert text.count("bot [prompt ") == 3 and "never read" not in text


def test_generate_bench_rows():
    from spt_fast.benchmarks.generate import run_generate_bench

    rows = run_generate_bench("preset:tiny", batch_sizes=(1, 3), context_len=12, new_tokens=8, repeats=1)
    assert [(r["impl"], r["batch"]) for r in rows] == [("hf", 1), ("spt_fast", 1), ("hf", 3), ("spt_fast", 3)]
    for r in rows:
        assert r["ttft_ms"] > 0 and r["device"] == "cpu"
        assert {"impl", "model", "device", "dtype", "batch", "ttft_ms", "decode_tokens_per_s", "step_ms"} <= set(r)
        assert r["read_GBps"] > 0 and r["cpu"] and r["clock"] == "wall"
        # A tiny model's few steps can vanish in a busy machine's noise (CI failed on it while another
        # job shared the CPUs): the step is then reported as not measured, never as a number <= 0.
        step = [r["step_ms"], r["decode_tokens_per_s"], r["roofline_pct"]]
        assert all(x is None for x in step) or (step[0] > 0 and step[1] > 0 and step[2] >= 0), r
    json.dumps(rows)  # what --json writes
    with pytest.raises(SPTError, match="GPU benchmark"):
        run_generate_bench("preset:llama-2-7b", device="cpu")


def test_generate_bench_table_says_when_a_step_was_not_measured():
    from spt_fast.benchmarks.generate import format_rows

    common = {"batch": 1, "ttft_ms": 10.0, "step_ms": None, "achieved_GBps": None, "read_GBps": 50.0,
              "roofline_pct": None, "cpu": "X"}
    text = format_rows([{**common, "impl": "hf", "decode_tokens_per_s": 20.0},
                        {**common, "impl": "spt_fast", "decode_tokens_per_s": None, "ttft_ms": 5.0}])
    assert "spt_fast batch 1: decode (not measured) transformers generate, ttft 2.00x" in text


def test_bench_generate_cli_writes_json(tmp_path, capsys):
    import argparse

    from spt_fast.cli import bench

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="cmd"))
    out = tmp_path / "gen.json"
    args = parser.parse_args(["bench", "generate", "--model", "preset:tiny", "--batch-sizes", "2", "--context-len",
                              "8", "--new-tokens", "3", "--repeats", "1", "--impls", "spt_fast", "--json", str(out)])
    bench.run(args)
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["batch"]) for r in rows] == [("spt_fast", 2)]
    assert "decode_tokens_per_s" in capsys.readouterr().out
    with pytest.raises(SPTError, match="batch-sizes"):
        bench.run(parser.parse_args(["bench", "generate", "--batch-sizes", "x"]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_decode_equals_eager(char_tok, device):
    # CPU: inductor C++ with frozen weights, one row as streamed product-sums and several through
    # oneDNN-packed weights (spt_fast.model.cpu_projections); CUDA: CUDA graphs.
    spt = spt_for(tiny(seed=9))
    spt.to(device)
    eager = Engine(spt, char_tok, compile=False)
    compiled = Engine(spt, char_tok, compile=True)
    assert compiled.cpu_projections == (device == "cpu")
    for convs in (CONVS, CONVS[:1]):
        for kw in (dict(), dict(temperature=0.8, top_p=0.9, seed=1), dict(stops=(), max_new_tokens=40)):
            a = eager.generate(convs, **kw)
            b = compiled.generate(convs, **kw)
            assert [r.tokens for r in a] == [r.tokens for r in b]
    # A longer generation needs a longer cache: the compiled step must notice the new cache (the
    # guards it keeps) instead of running the graph built for the old one.
    kw = dict(stops=(), max_new_tokens=300, ignore_eos=True)
    a, b = eager.generate(CONVS[:2], **kw), compiled.generate(CONVS[:2], **kw)
    assert compiled.backend.caches[0].seq_len > 256
    assert [r.tokens for r in a] == [r.tokens for r in b]
    # Another model of the same shapes, compiled in the same process, runs its own weights.
    other = spt_for(tiny(seed=10)).to(device)
    want = Engine(other, char_tok).generate(CONVS)
    got = Engine(other, char_tok, compile=True).generate(CONVS)
    assert [r.tokens for r in got] == [r.tokens for r in want] != [r.tokens for r in eager.generate(CONVS)]
    if device == "cpu":  # a model of another structure (int8 layers) compiled in the same process
        want = Engine(other, char_tok, weights="int8").generate(CONVS)
        got = Engine(other, char_tok, compile=True, weights="int8").generate(CONVS)
        assert [r.tokens for r in got] == [r.tokens for r in want]


# --- the real embedded model ------------------------------------------------------------------------

@pytest.mark.slow
def test_embedded_model_greedy_equals_hf_path():
    from spt_fast.model.loading import load

    base, tok = load("default")
    convs = [
        (["i love hiking in the mountains.", "i have two dogs."], ["hi! how is your weekend going?"]),
        (["i am a teacher."], ["hello", "hi there, what do you do?", "i fix cars. and you?"]),
        ([], ["what is your favorite food?"]),
        (["i play the guitar.", "my favorite color is blue.", "i live in a big city."], []),
    ]
    for layout in ("shared", "prefix"):
        spt = build_spt_model(base, SPTConfig(num_prompts=4, prompt_len=8, layout=layout, init="vocab", seed=1))
        engine = Engine(spt, tok)
        assert engine.fast
        for prompts in (None, [3, 1, 0, 2]):
            ref, ref_prompts = oracle(spt, tok, convs, 32, prompts=prompts)
            got = engine.generate(convs, max_new_tokens=32, prompt=prompts)
            assert [r.text for r in got] == ref, layout
            assert engine.last_prompts == ref_prompts
        assert sum(len(t) for t in ref) > 20


def test_generation_dtype_follows_the_cpu(saved, monkeypatch):
    """bf16 by default on a CPU with native bf16 math, the training dtype elsewhere; --dtype wins."""
    from spt_fast.generation import engine as engine_module

    ck, _ = saved
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: True)
    assert engine_module.generation_dtype("cpu") == "bf16"
    assert Engine.from_checkpoint(ck, device="cpu").spt.dtype == torch.bfloat16
    assert Engine.from_checkpoint(ck, device="cpu", dtype="fp32").spt.dtype == torch.float32
    assert Engine.from_checkpoint(ck, device="cpu", dtype="recorded").spt.dtype == torch.float32
    assert engine_module.generation_dtype("cuda") is None
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: False)
    assert Engine.from_checkpoint(ck, device="cpu").spt.dtype == torch.float32


def test_the_server_runs_bf16_only_where_a_reply_cannot_depend_on_its_batch(saved, monkeypatch):
    """Engine.for_serving: bf16 on a native-bf16 CPU where the engine is batch_invariant, else the
    training dtype; --dtype wins."""
    from spt_fast.generation import engine as engine_module

    ck, _ = saved
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(Engine, "batch_invariant", lambda self: True)
    assert Engine.for_serving(ck, device="cpu").spt.dtype == torch.bfloat16
    assert Engine.for_serving(ck, device="cpu", dtype="fp32").spt.dtype == torch.float32
    monkeypatch.setattr(Engine, "batch_invariant", lambda self: False)
    assert Engine.for_serving(ck, device="cpu").spt.dtype == torch.float32
    assert Engine.for_serving(ck, device="cpu", dtype="bf16").spt.dtype == torch.bfloat16
    monkeypatch.setattr(Engine, "batch_invariant", lambda self: True)
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: False)
    assert Engine.for_serving(ck, device="cpu").spt.dtype == torch.float32


def test_batch_invariant_means_the_c_step_serves_every_batch_size_with_dense_weights(monkeypatch):
    from spt_fast.model import cpu_native
    from spt_fast.model import cpu_projections as cp

    if cpu_native.library() is None:
        pytest.skip("the CPU kernels could not be built here")
    spt = spt_for(testing.tiny_llama(vocab_size=128, init_std=0.2), K=2, L=2)
    monkeypatch.setattr(cp, "choose_decode_attention", lambda *a, **k: "native")
    native = {1: "native", 2: "native", 3: "native"}
    monkeypatch.setattr(cp, "choose_kernels", lambda projections, cache=None: native)
    assert Engine(spt, None, compile=False).batch_invariant()
    assert not Engine(spt, None, compile=False, weights="int8").batch_invariant()  # int kernels or tiles by rows
    monkeypatch.setattr(cp, "choose_kernels", lambda projections, cache=None: {**native, 2: "blas"})
    assert not Engine(spt, None, compile=False).batch_invariant()  # batched steps: the BLAS's own sum order
    monkeypatch.setattr(cp, "choose_kernels", lambda projections, cache=None: native)
    monkeypatch.setenv("SPT_FAST_FUSED_DECODE", "0")
    assert not Engine(spt, None, compile=False).batch_invariant()  # layer by layer: no such promise


# ---- decode-step modes: eager, compiled, and "background" (the CPU default of from_checkpoint and
# of the generating CLIs: a call runs eagerly until its kind of step was compiled between calls) ----
def test_compile_mode_resolution(monkeypatch):
    monkeypatch.setenv("SPT_FAST_COMPILE", "auto")
    assert compile_mode("auto", "cpu", cpu_projections=True) == "background"
    assert compile_mode("auto", "cpu", cpu_projections=False) is False  # e.g. NF4 bases on CPU
    assert compile_mode("auto", "cuda", cpu_projections=False) is False
    assert compile_mode("on", "cpu", True) is True and compile_mode(True, "cpu", True) is True
    assert compile_mode("off", "cpu", True) is False and compile_mode(False, "cpu", True) is False
    assert compile_mode("background", "cpu", True) == "background"
    monkeypatch.setenv("SPT_FAST_COMPILE", "off")
    assert compile_mode("auto", "cpu", True) is False
    assert compile_mode("on", "cpu", True) is True  # an explicit choice beats the environment
    monkeypatch.setenv("SPT_FAST_COMPILE", "ON")
    assert compile_mode("auto", "cpu", True) is True
    monkeypatch.setenv("SPT_FAST_COMPILE", "fast")
    with pytest.raises(SPTError, match="SPT_FAST_COMPILE='fast'"):
        compile_mode("auto", "cpu", True)
    with pytest.raises(SPTError, match="compile='yes'"):
        compile_mode("yes", "cpu", True)


def test_persistent_compile_cache_folder(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("SPT_FAST_CACHE", str(tmp_path))
    for start in (None, default_cache_dir()):  # unset, or the /tmp default inductor wrote there itself
        if start is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", start)
        use_persistent_compile_cache()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    mine = str(tmp_path / "mine")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", mine)  # the user's choice stays
    use_persistent_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == mine


def test_cli_compile_flag():
    p = build_parser()
    for cmd in (["chat"], ["generate"], ["eval"]):
        assert p.parse_args(cmd + ["--checkpoint", "x"]).compile == "auto"
        assert p.parse_args(cmd + ["--checkpoint", "x", "--compile"]).compile == "on"
        assert p.parse_args(cmd + ["--checkpoint", "x", "--compile", "off"]).compile == "off"
    with pytest.raises(SystemExit):
        p.parse_args(["chat", "--checkpoint", "x", "--compile", "always"])


def test_background_compile_mode(char_tok, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    spt = spt_for(tiny(seed=11))
    eager = Engine(spt, char_tok, compile=False)
    bg = Engine(spt, char_tok, compile="background")
    assert bg.compile == "background" and bg.cpu_projections
    backend = bg.backend
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    want = [r.tokens for r in eager.generate(CONVS)]
    # The first call of a kind of step runs eagerly and compiles nothing (a one-off call).
    assert [r.tokens for r in bg.generate(CONVS)] == want
    assert backend._latched is False and not backend._pending and not backend._ready
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    # The second compiles that kind first and runs compiled: the same tokens (fp32).
    assert [r.tokens for r in bg.generate(CONVS)] == want
    assert backend._latched is True and len(backend._ready) == 1
    # The graph traced on the scratch caches serves the engine's own caches: one graph, no recompile.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    assert [r.tokens for r in bg.generate(CONVS)] == want and backend._latched is True
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1

    # Another kind (sampling: a noise input, other constants): eager first; compile_pending (chat,
    # between turns) compiles it in a second thread; the next call waits for it and runs compiled.
    # A seeded sampled reply is the same either way.
    kw = dict(temperature=0.8, top_p=0.9, seed=3)
    first = [r.tokens for r in bg.generate(CONVS, **kw)]
    assert backend._latched is False
    bg.compile_pending()
    assert len(backend._pending) == 1
    assert [r.tokens for r in bg.generate(CONVS, **kw)] == first == [r.tokens for r in eager.generate(CONVS, **kw)]
    assert backend._latched is True and len(backend._ready) == 2 and not backend.compiling
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 2


def test_chat_compiles_between_turns(saved, char_tok):
    # chat's default engine on CPU: the first turn eager, the step compiled while the user would be
    # typing (compile_pending), later turns compiled; the replies are the eager engine's (fp32).
    import argparse

    from spt_fast.cli import chat

    ck, spt = saved
    parser = argparse.ArgumentParser()
    chat.add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["chat", "--checkpoint", str(ck), "--max-new-tokens", "12"])
    engine = Engine.from_checkpoint(ck, device="cpu", dtype="fp32", compile="background")
    out = io.StringIO()
    chat.run(args, stdin=io.StringIO("hello there\nhow are you?\nbye\n"), stdout=out, engine=engine)
    assert engine.backend._ready and engine.backend._latched is True and not engine.backend.compiling
    eager = Engine.from_checkpoint(ck, device="cpu", dtype="fp32", compile="off")
    history = []
    for message in ("hello there", "how are you?", "bye"):
        history.append(message)
        history.append(eager.reply([], history, max_new_tokens=12))
        assert f"]> {history[-1]}\n" in out.getvalue()


def test_chat_process_ends_cleanly_while_compiling(saved, tmp_path):
    # One message, then end of input: chat ends while its step compiles in the second thread.
    # With the embedded model Python's shutdown aborted there (status 134, "terminate called
    # without an active exception"); whether it does depends on the compile's phase at exit (this
    # tiny model's compile did not abort), so chat._leave is also tested directly below.
    import subprocess
    import sys

    ck, _ = saved
    env = {**os.environ, "SPT_FAST_COMPILE": "auto", "SPT_FAST_CACHE": str(tmp_path),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "spt_fast", "chat", "--checkpoint", str(ck), "--dtype", "fp32",
                           "--max-new-tokens", "8"], input="hello there\n", capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bot [prompt " in proc.stdout and "terminate called" not in proc.stderr


def test_chat_leaves_at_once_while_compiling(monkeypatch):
    from types import SimpleNamespace

    from spt_fast.cli import chat

    exits = []
    monkeypatch.setattr(chat.os, "_exit", exits.append)
    out = io.StringIO()
    busy = SimpleNamespace(backend=SimpleNamespace(compiling=True))
    idle = SimpleNamespace(backend=SimpleNamespace(compiling=False))
    chat._leave(busy, True, out, 130)
    chat._leave(busy, False, out, 0)  # a caller's own engine (tests): never exits their process
    chat._leave(idle, True, out, 0)
    assert exits == [130]


def test_background_compile_failure_stays_eager(char_tok):
    spt = spt_for(tiny(seed=12))
    bg = Engine(spt, char_tok, compile="background")
    want = [r.tokens for r in Engine(spt, char_tok, compile=False).generate(CONVS[:1])]

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    bg.backend._make_compiled(False)  # its settings, as the first step would make them
    bg.backend._compiled = broken
    assert [r.tokens for r in bg.generate(CONVS[:1])] == want  # eager: the first of its kind
    with pytest.warns(UserWarning, match="compiling the decode step failed.*no compiler here"):
        assert [r.tokens for r in bg.generate(CONVS[:1])] == want
    assert bg.backend._latched is False
    bg.compile_pending()  # no second attempt
    assert not bg.backend._pending
    assert [r.tokens for r in bg.generate(CONVS[:1])] == want and bg.backend._latched is False
