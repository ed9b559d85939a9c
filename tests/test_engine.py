"""The shared-context fast engine equals the full forward of `[context][P_k][response]` through
transformers (the generic path, itself checked against per-sample forwards in test_spt.py):
losses and gradients, fp32, with and without a 4-bit base; and the layout dispatch."""
import pytest
import torch

from spt_fast.data.corpora import Sample
from spt_fast.model.build import build_spt_model, resolve_layout
from spt_fast.model.shared import SharedSPTModel
from spt_fast.errors import ModelLoadError
from spt_fast.data.batch import collate
from spt_fast.model.spt import SPTConfig, SPTModel
from spt_fast.testing import tiny_llama
from spt_fast.data.text import Encoder

SAMPLES = [
    Sample(("i like cats.",), ("hi there", "hello!", "how are you?"), "great, thanks.", "d0", 1),
    Sample(("i drive a bus.", "i am tall."), ("hey",), "hello to you too, friend.", "d1", 0),
    Sample((), ("a", "b", "c", "d", "what?"), "ok", "d2", 2),
]


def _batch(tok, cfg):
    enc = Encoder(tok, cfg.max_len, cfg.prompt_len)
    return collate([enc.encode(s) for s in SAMPLES], tok.pad_token_id, tok.bos_token_id)


def _params(m):
    return [m.prompts.weight, m.retriever.proj.weight, m.retriever.proj.bias]


def _compare(fast, slow, batch, rtol=1e-5, grad_rtol=1e-4):
    a, b = fast(batch), slow(batch)
    # The selection target is softmax(-CE / tau_gold): an fp32 rounding difference in a CE reaches
    # the selection loss and its gradients 1/tau_gold times larger, so their floor scales with it.
    atol = {"sel": 1e-6 / fast.config.tau_gold}
    for name in ("lm", "sel", "fus", "ctr", "loss"):
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol.get(name, 1e-6), msg=name)
    torch.testing.assert_close(a["seq_ce_mean"], b["seq_ce_mean"], rtol=rtol, atol=1e-6)
    ga = torch.autograd.grad(a["loss"], _params(fast))
    gb = torch.autograd.grad(b["loss"], _params(slow))
    for x, y in zip(ga, gb):
        assert y.abs().max() > 0
        torch.testing.assert_close(x, y, rtol=grad_rtol, atol=1e-6 / fast.config.tau_gold)


@pytest.mark.parametrize("K,L", [(3, 4), (1, 1), (2, 5)])
def test_shared_fast_path_equals_full_forward(char_tok, K, L):
    base = tiny_llama(init_std=0.1)
    cfg = SPTConfig(num_prompts=K, prompt_len=L, layout="shared", init="random", use_fus=True)
    fast = build_spt_model(base, cfg)
    assert isinstance(fast, SharedSPTModel)
    slow = SPTModel(base, SPTConfig(**{**cfg.to_dict(), "layout": "shared"}))
    slow.load_trainable_state_dict(fast.trainable_state_dict())
    _compare(fast, slow, _batch(char_tok, cfg))


def test_shared_fast_path_through_4bit_layers(char_tok):
    from spt_fast.model.quant import quantize_linear_layers

    base = quantize_linear_layers(tiny_llama(init_std=0.1), compute_dtype=torch.float32)
    cfg = SPTConfig(num_prompts=2, prompt_len=3, layout="shared", init="random")
    fast = build_spt_model(base, cfg)
    slow = SPTModel(base, SPTConfig(**cfg.to_dict()))
    slow.load_trainable_state_dict(fast.trainable_state_dict())
    _compare(fast, slow, _batch(char_tok, cfg), rtol=1e-4, grad_rtol=1e-3)


def test_layout_dispatch(tiny_opt, tiny_llama):
    assert resolve_layout("auto", tiny_llama) == "shared"
    with pytest.warns(UserWarning, match="falling back to the prefix layout"):
        assert resolve_layout("auto", tiny_opt) == "prefix"
    with pytest.raises(ModelLoadError, match="--layout shared needs a Llama"):
        build_spt_model(tiny_opt, SPTConfig(num_prompts=2, prompt_len=2, layout="shared"))
    m = build_spt_model(tiny_opt, SPTConfig(num_prompts=2, prompt_len=2, layout="prefix"))
    assert type(m) is SPTModel
