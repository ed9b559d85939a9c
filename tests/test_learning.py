"""A learning test: on a synthetic task where the best prompt depends on the context, SPT's loss
falls and the retriever's top-1 choice agrees with the best prompt far above chance."""
import random

import torch

from spt_fast.data.corpora import Sample
from spt_fast.data.batch import collate
from spt_fast.model.spt import SPTConfig
from spt_fast.testing import tiny_llama
from spt_fast.data.text import Encoder

# Two kinds of speaker: whatever the partner says, one always answers in x's, the other in o's.
KINDS = {"i shout a lot.": "xxxx xxxx", "i whisper softly.": "oooo oooo"}
OPENERS = ["hi", "hello", "how are you", "what's up", "hey you", "good day", "yo", "any news"]


def make_samples(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        persona, reply = rng.choice(list(KINDS.items()))
        out.append(Sample((persona,), (rng.choice(OPENERS),), reply, f"d{i}", 0))
    return out


def kind_of(samples):
    return torch.tensor([int(s.persona[0] == "i whisper softly.") for s in samples])


class Task:
    """The synthetic task on a tiny random Llama (init_std 0.2: outputs a soft prompt can steer, see
    testing.tiny_llama): training samples, a held-out batch, and seeded training batches."""

    def __init__(self, char_tok, layout: str):
        from spt_fast.model.build import build_spt_model

        torch.manual_seed(0)
        base = tiny_llama(hidden=64, layers=2, seed=1, init_std=0.2)
        cfg = SPTConfig(num_prompts=2, prompt_len=4, init="random", lambda_sel=1.0, lambda_ctr=1.0, seed=3,
                        layout=layout)
        self.spt = build_spt_model(base, cfg)
        self.pad, self.bos = char_tok.pad_token_id, char_tok.bos_token_id
        enc = Encoder(char_tok, 128, cfg.prompt_len)
        train_s, test_s = make_samples(256, 0), make_samples(64, 1)
        self.train = [enc.encode(s) for s in train_s]
        self.test = collate([enc.encode(s) for s in test_s], self.pad, self.bos)
        self.kinds_train, self.kinds_test = kind_of(train_s), kind_of(test_s)

    def batch(self, seed):
        idx = random.Random(seed).sample(range(len(self.train)), 8)
        return collate([self.train[i] for i in idx], self.pad, self.bos), self.kinds_train[idx]

    def specialise_prompts(self):
        """Set-up: prompt k trained only on speaker kind k, so that which prompt is best really
        depends on the context."""
        opt = torch.optim.Adam([self.spt.prompts.weight], lr=5e-2)
        for step in range(80):
            batch, kinds = self.batch(step)
            _step(opt, _own_kind_ce(self.spt, batch, kinds))

    def train_spt(self):
        """SPT proper: every trainable part, all four losses, 120 steps."""
        opt = torch.optim.Adam([p for p in self.spt.parameters() if p.requires_grad], lr=1e-2)
        for step in range(100, 220):
            _step(opt, self.spt(self.batch(step)[0])["loss"])


def _step(opt, loss):
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_spt_learns_context_dependent_prompt_choice(char_tok):
    task = Task(char_tok, "prefix")
    spt, test = task.spt, task.test
    task.specialise_prompts()
    with torch.no_grad():
        before = spt(test)
    oracle = before["seq_ce_mean"].argmin(0)
    assert (oracle == task.kinds_test).float().mean() > 0.95  # the set-up worked: the best prompt = the kind

    # SPT proper, from a fresh retriever. Its pick must come to match the best prompt.
    spt.retriever.proj.reset_parameters()
    first = float(spt(test)["loss"])
    task.train_spt()
    with torch.no_grad():
        after = spt(test)
        pick = spt.select(test)
    oracle = after["seq_ce_mean"].argmin(0)
    agree = (pick == oracle).float().mean().item()
    assert float(after["loss"]) < 0.8 * first, (first, float(after["loss"]))
    assert agree >= 0.9, f"retriever agrees with the best prompt on {agree:.0%} (chance 50%)"


def _own_kind_ce(spt, batch, kinds):
    """Mean CE of each sample under the prompt of its own kind (the set-up's training signal)."""
    K = spt.config.num_prompts
    B = batch.input_ids.shape[0]
    embeds = spt.embed(batch.input_ids)
    hidden = spt.response_hidden(batch, embeds, torch.arange(K * B) // B)  # [K,B,R,d]
    own = hidden[kinds, torch.arange(B)]  # [B,R,d]
    logits = spt.base.get_output_embeddings()(own)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.targets, ignore_index=-100)


def test_retriever_choice_becomes_context_dependent_in_the_shared_layout(char_tok):
    """The shared layout with the centred retriever: from prompts that each fit one kind of speaker,
    SPT's retriever comes to pick by context (usage entropy above zero on held-out contexts) and
    its pick has a lower CE than a random prompt."""
    task = Task(char_tok, "shared")
    spt, test = task.spt, task.test
    task.specialise_prompts()
    spt.retriever.proj.reset_parameters()
    spt.fit_context_statistics([task.batch(1000 + i)[0] for i in range(8)])
    with torch.no_grad():
        before = spt.eval_losses(test)
    task.train_spt()
    with torch.no_grad():
        after = spt.eval_losses(test)
    usage = torch.bincount(torch.tensor(after["picks"]), minlength=2).float() / len(after["picks"])
    entropy = float(-(usage[usage > 0] * usage[usage > 0].log()).sum())
    assert entropy > 0.3, (usage, before["picks"][:8])
    assert after["selected_ce_sum"] < after["random_ce_sum"] - 0.05 * after["n_tokens"]
    assert sum(after["pick_is_best"]) / len(after["pick_is_best"]) >= 0.8
