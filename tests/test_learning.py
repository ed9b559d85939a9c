"""A learning test: on a synthetic task where the best prompt depends on the context, SPT's loss
falls and the retriever's top-1 choice agrees with the best prompt far above chance."""
import random

import torch

from spt_fast.data import Sample
from spt_fast.spt import SPTConfig, SPTModel, collate
from spt_fast.testing import tiny_llama
from spt_fast.text import Encoder

# Two kinds of speaker: whatever the partner says, one always answers in x's, the other in o's.
# A frozen random LM cannot do either, and one soft prompt cannot serve both; two can, if the
# retriever learns from the persona which kind of speaker it is.
KINDS = {"i shout a lot.": "xxxx xxxx", "i whisper softly.": "oooo oooo"}
OPENERS = ["hi", "hello", "how are you", "what's up", "hey you", "good day", "yo", "any news"]


def make_samples(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        persona, reply = rng.choice(list(KINDS.items()))
        out.append(Sample((persona,), (rng.choice(OPENERS),), reply, f"d{i}", 0))
    return out


def test_spt_learns_context_dependent_prompt_choice(char_tok):
    torch.manual_seed(0)
    base = tiny_llama(hidden=64, layers=2, seed=1)
    cfg = SPTConfig(num_prompts=2, prompt_len=4, init="random", lambda_sel=1.0, lambda_ctr=1.0, seed=3)
    spt = SPTModel(base, cfg)
    enc = Encoder(char_tok, 128, cfg.prompt_len)
    train = [enc.encode(s) for s in make_samples(256, 0)]
    test = make_samples(64, 1)
    test_enc = [enc.encode(s) for s in test]
    opt = torch.optim.Adam([p for p in spt.parameters() if p.requires_grad], lr=3e-2)
    pad, bos = char_tok.pad_token_id, char_tok.bos_token_id

    def eval_batch():
        spt.eval()
        with torch.no_grad():
            b = collate(test_enc, pad, bos)
            out = spt(b)
            pick = spt.select(b)
        spt.train()
        oracle = out["seq_ce_mean"].argmin(0)
        return float(out["lm"]), pick, oracle

    first_lm, _, _ = eval_batch()
    for step in range(120):
        batch = collate(random.Random(step).sample(train, 8), pad, bos)
        loss = spt(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last_lm, pick, oracle = eval_batch()
    assert last_lm < 0.5 * first_lm, (first_lm, last_lm)
    agree = (pick == oracle).float().mean().item()
    assert agree >= 0.85, f"retriever agrees with the best prompt on {agree:.0%} (chance 50%)"
    # the two kinds of speaker end up on different prompts
    kinds = torch.tensor([s.persona[0] == "i shout a lot." for s in test])
    assert pick[kinds].float().mean().round() != pick[~kinds].float().mean().round()
