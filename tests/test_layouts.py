"""The placement rule (spt_fast.model.layouts) is the one place a layout is defined.

The built-in `shared` layout, `[context][P_k][ R:][response]` (the prompt before the context's
final " R:" tag, whose token length comes from the encoder), and a layout registered by this test
alone (`middle`: the prompt in the middle of the context) are honoured by training on both paths
(whole sequences, and the shared-context engine that runs `context[:pos]` once) against a naive
full forward through transformers, by the generation engine and by the Hugging Face oracle, with
no other change anywhere.
"""
import pytest
import torch
import torch.nn.functional as F

from spt_fast.data.batch import collate
from spt_fast.data.corpora import Sample
from spt_fast.data.text import REPLY_TAG, Encoder
from spt_fast.errors import SPTError
from spt_fast.generation.engine import Engine
from spt_fast.generation.oracle import generate_batch
from spt_fast.model.build import build_spt_model
from spt_fast.model.layouts import Layout, layout_choices, prompt_positions, register_layout, unregister_layout
from spt_fast.model.shared import SharedSPTModel
from spt_fast.model.spt import SPTConfig, SPTModel
from spt_fast.testing import tiny_llama

# The whole of what adding a placement takes:
MIDDLE = Layout("middle", lambda ctx_len, tag_len: ctx_len // 2, shares_context=True,
                description="[context (first half)][P][context (second half)][response]")

SAMPLES = [
    Sample(("i like cats.",), ("hi there", "hello!", "how are you?"), "great, thanks.", "d0", 1),
    Sample(("i drive a bus.", "i am tall."), ("hey",), "too busy driving.", "d1", 0),
    Sample((), ("a", "b", "c", "what?"), "no idea at all.", "d2", 2),
]


@pytest.fixture
def middle():
    register_layout(MIDDLE)
    yield MIDDLE.name
    unregister_layout(MIDDLE.name)


def test_builtin_positions_and_unknown_names():
    ctx_len, tag_len = torch.tensor([5, 9]), torch.tensor([2, 2])
    assert prompt_positions("prefix", ctx_len, tag_len).tolist() == [0, 0]
    assert prompt_positions("shared", ctx_len, tag_len).tolist() == [3, 7]
    assert prompt_positions("shared-old", ctx_len, tag_len).tolist() == [5, 9]
    assert {"auto", "prefix", "shared", "shared-old"} <= set(layout_choices())
    with pytest.raises(SPTError, match="layout must be one of"):
        prompt_positions("sideways", ctx_len)
    with pytest.raises(SPTError, match="layout must be one of"):
        SPTConfig(layout="sideways").validate()
    with pytest.raises(ValueError, match="already defined"):
        register_layout(Layout("prefix", lambda c, t: c, False, ""))


def test_tag_length_comes_from_the_tokenizer(char_tok):
    enc = Encoder(char_tok, 256, 4)
    e = enc.encode(SAMPLES[0])
    tag = char_tok.encode(REPLY_TAG, add_special_tokens=False)
    assert e.tag_len == len(tag) == 3  # the char tokenizer: " ", "R", ":"
    assert e.context_ids[-e.tag_len:] == tag
    assert collate([e], char_tok.pad_token_id, char_tok.bos_token_id).tag_len.tolist() == [3]


def naive_seq_ce(spt, encoded, where):
    """Mean response CE of every prompt on every sample: one full HF forward of the sequence
    built by hand, context[:pos] ++ P_k ++ context[pos:] ++ response, pos = where(encoded)."""
    base, emb, P = spt.base, spt.base.get_input_embeddings(), spt.prompts.weight
    out = torch.zeros(P.shape[0], len(encoded))
    for b, e in enumerate(encoded):
        ctx, resp = emb(torch.tensor(e.context_ids)), emb(torch.tensor(e.response_ids))
        pos = where(e)
        for k in range(P.shape[0]):
            x = torch.cat([ctx[:pos], P[k], ctx[pos:], resp])[None]
            logits = base(inputs_embeds=x).logits[0]
            r0 = P.shape[1] + len(e.context_ids)
            out[k, b] = F.cross_entropy(logits[r0 - 1:r0 - 1 + len(e.response_ids)], torch.tensor(e.response_ids))
    return out


# Where each layout puts the prompt, written out by hand for the naive reference.
BY_HAND = {"shared": lambda e: len(e.context_ids) - e.tag_len, "middle": lambda e: len(e.context_ids) // 2}


@pytest.mark.parametrize("layout", ["shared", "middle"])
def test_layout_trains_the_same_everywhere(layout, middle, char_tok):
    base = tiny_llama(init_std=0.1)
    cfg = SPTConfig(num_prompts=3, prompt_len=4, layout=layout, init="random", max_len=256)
    shared = build_spt_model(base, cfg, char_tok)
    assert isinstance(shared, SharedSPTModel)  # a layout that shares the context gets the fast path
    whole = SPTModel(base, cfg, char_tok)
    whole.load_trainable_state_dict(shared.trainable_state_dict())
    encoded = [Encoder(char_tok, 256, 4).encode(s) for s in SAMPLES]
    batch = collate(encoded, char_tok.pad_token_id, char_tok.bos_token_id)
    outs, grads = [], []
    for spt in (shared, whole):
        out = spt(batch)
        grads.append(torch.autograd.grad(out["loss"], [spt.prompts.weight, spt.retriever.proj.weight]))
        outs.append(out)
    torch.testing.assert_close(outs[0]["loss"], outs[1]["loss"], atol=1e-5, rtol=1e-5)
    for g_shared, g_whole in zip(*grads):
        torch.testing.assert_close(g_shared, g_whole, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        want = naive_seq_ce(whole, encoded, BY_HAND[layout])
    for out in outs:
        torch.testing.assert_close(out["seq_ce_mean"], want, atol=1e-5, rtol=1e-5)
    # The placement matters: the same prompts right after the whole context score differently.
    with torch.no_grad():
        old = SPTModel(base, cfg.replace(layout="shared-old"), char_tok)
        old.load_trainable_state_dict(shared.trainable_state_dict())
        assert not torch.allclose(old(batch)["seq_ce_mean"], want, atol=1e-3)


@pytest.mark.parametrize("layout", ["shared", "middle", "shared-old"])
def test_layout_engine_equals_oracle(layout, middle, char_tok):
    base = tiny_llama(init_std=0.1)
    spt = build_spt_model(base, SPTConfig(num_prompts=3, prompt_len=4, layout=layout, init="random",
                                          max_len=256), char_tok)
    convs = [(s.persona, s.history) for s in SAMPLES]
    engine = Engine(spt, char_tok)
    contexts = [Encoder(char_tok, 256, 4).encode(s, with_response=False) for s in SAMPLES]
    batch = collate(contexts, char_tok.pad_token_id, char_tok.bos_token_id)
    for prompts in (None, [2, 0, 1]):
        want, want_prompts = generate_batch(spt, char_tok, batch, 16, stops=(),
                                            prompt_idx=None if prompts is None else torch.tensor(prompts))
        got = engine.generate(convs, max_new_tokens=16, stops=(), prompt=prompts)
        assert [r.text for r in got] == want and [r.prompt for r in got] == want_prompts
        # Ready-made ids find the tag themselves (its tokens for this tokenizer).
        ids = engine.generate_ids([e.context_ids for e in contexts], max_new_tokens=16, stops=(), prompt=prompts)
        assert [r.text for r in ids] == want
