"""SPT on the generic Hugging Face path: the batched K·B forward against naive per-prompt,
per-sample forwards, all four losses and their gradients, and batched per-row generation."""
import pytest
import torch
import torch.nn.functional as F

from spt_fast.data.corpora import Sample
from spt_fast.generation.oracle import generate_batch
from spt_fast.data.batch import collate
from spt_fast.model.spt import SPTConfig, SPTModel
from spt_fast.data.text import Encoder
from spt_fast.errors import SPTError

SAMPLES = [
    Sample(("i like cats.", "i am tall."), ("hi there", "hello!", "how are you?"), "great, thanks.", "d0", 1),
    Sample(("i like cats.", "i am tall."), ("what do you do?",), "i teach.", "d0", 0),
    Sample(("i drive a bus.",), ("hey", "yo", "any pets?", "no", "why not"), "too busy driving all day long.", "d1", 2),
]


def _encode(tok, cfg, samples=SAMPLES, with_response=True):
    enc = Encoder(tok, cfg.max_len, cfg.prompt_len)
    return [enc.encode(s, with_response=with_response) for s in samples]


def naive_losses(spt: SPTModel, encoded, cfg: SPTConfig, bos_id: int):
    """Every prompt on every sample, one unbatched full forward each, logits over all positions."""
    base = spt.base
    emb = base.get_input_embeddings()
    K, L = cfg.num_prompts, cfg.prompt_len
    P = spt.prompts.weight
    ce_sum = torch.zeros(K, len(encoded))
    counts = torch.tensor([len(e.response_ids) for e in encoded], dtype=torch.float)
    fused_logits = []
    feats = []
    for b, e in enumerate(encoded):
        ctx = emb(torch.tensor(e.context_ids))
        resp = emb(torch.tensor(e.response_ids))
        start = 1 if e.context_ids[0] == bos_id else 0
        feats.append(ctx[start:].mean(0))
        per_k = []
        for k in range(K):
            # prefix: [P][context][response]; shared: [context][P][ R:][response] (prompt before the tag)
            cut = len(e.context_ids) - e.tag_len
            parts = [P[k], ctx, resp] if cfg.layout == "prefix" else [ctx[:cut], P[k], ctx[cut:], resp]
            x = torch.cat(parts)[None]
            logits = base(inputs_embeds=x).logits[0]
            r0 = L + len(e.context_ids)
            z = logits[r0 - 1 : r0 - 1 + len(e.response_ids)]
            y = torch.tensor(e.response_ids)
            ce_sum[k, b] = F.cross_entropy(z, y, reduction="sum")
            per_k.append(z)
        fused_logits.append(torch.stack(per_k))  # [K, R, V]
    feats = torch.stack(feats)
    W = spt.retriever.proj
    keys = W((P if cfg.key_grad else P.detach()).mean(1))  # key_grad off: the retriever's losses train W only
    s = F.softplus(F.cosine_similarity(W(feats)[:, None, :], keys[None, :, :], dim=-1), beta=10, threshold=1)
    # each sample's LM loss: `route` of it on the retriever's top pick, the rest spread over the K
    weights = torch.full((K, len(encoded)), (1.0 - cfg.route) / K if K > 1 else 1.0)
    if K > 1:
        weights[s.detach().argmax(-1), torch.arange(len(encoded))] += cfg.route
    lm = (weights * ce_sum).sum() / counts.sum()
    mean = ce_sum / counts
    log_pi = F.log_softmax(-mean.detach().t() / cfg.tau_gold, -1)
    sel = (log_pi.exp() * (log_pi - F.log_softmax(s / cfg.tau_sim, -1))).sum(-1).mean()
    fus = torch.stack([
        F.cross_entropy((s[b][:, None, None] * z).sum(0), torch.tensor(e.response_ids))
        for b, (z, e) in enumerate(zip(fused_logits, encoded))
    ]).mean()
    y = spt.pair_labels([e.persona_key for e in encoded])
    pairs = [(i, j) for i in range(len(encoded)) for j in range(i + 1, len(encoded))]
    ctr = torch.stack([F.cosine_embedding_loss(s[i][None], s[j][None], y[i, j][None]) for i, j in pairs]).mean()
    total = lm + cfg.lambda_sel * sel + fus + cfg.lambda_ctr * ctr
    return {"lm": lm, "sel": sel, "fus": fus, "ctr": ctr, "loss": total, "seq_ce_mean": mean, "scores": s}


@pytest.mark.parametrize("layout", ["prefix", "shared"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
# the paper's plain LM mean with its key gradients, and a routed one with the keys detached (the default)
@pytest.mark.parametrize("route,key_grad", [(0.0, True), (0.6, False)])
def test_batched_forward_matches_naive(layout, arch, route, key_grad, char_tok, tiny_llama, tiny_opt):
    base = tiny_llama if arch == "llama" else tiny_opt
    cfg = SPTConfig(num_prompts=3, prompt_len=4, layout=layout, init="random", lambda_sel=0.7, lambda_ctr=0.3,
                    route=route, key_grad=key_grad)
    spt = SPTModel(base, cfg)
    encoded = _encode(char_tok, cfg)
    batch = collate(encoded, char_tok.pad_token_id, char_tok.bos_token_id)
    fast = spt(batch)
    params = [spt.prompts.weight, spt.retriever.proj.weight, spt.retriever.proj.bias]
    g_fast = torch.autograd.grad(fast["loss"], params)
    ref = naive_losses(spt, encoded, cfg, char_tok.bos_token_id)
    g_ref = torch.autograd.grad(ref["loss"], params)
    torch.testing.assert_close(fast["seq_ce_mean"], ref["seq_ce_mean"].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast["scores"], ref["scores"].detach(), rtol=1e-5, atol=1e-6)
    for name in ("lm", "sel", "fus", "ctr", "loss"):
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    for gf, gr in zip(g_fast, g_ref):
        assert gr.abs().max() > 0
        torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["prefix", "shared"])
def test_routed_lm_loss_trains_the_picked_prompt(layout, char_tok, tiny_llama):
    # route=1 with the other losses off: each sample's LM loss reaches only the prompt the
    # retriever picks for it, and equals the naive per-prompt CE under that pick.
    cfg = SPTConfig(num_prompts=3, prompt_len=4, layout=layout, init="random", route=1.0,
                    use_sel=False, use_fus=False, use_ctr=False)
    spt = SPTModel(tiny_llama, cfg)
    encoded = _encode(char_tok, cfg)
    batch = collate(encoded, char_tok.pad_token_id, char_tok.bos_token_id)
    out = spt(batch)
    pick = out["scores"].argmax(-1)
    (grad,) = torch.autograd.grad(out["loss"], [spt.prompts.weight])
    ref = naive_losses(spt, encoded, cfg, char_tok.bos_token_id)
    counts = torch.tensor([len(e.response_ids) for e in encoded], dtype=torch.float)
    want = (ref["seq_ce_mean"][pick, torch.arange(len(encoded))] * counts).sum() / counts.sum()
    torch.testing.assert_close(out["lm"], want.detach(), rtol=1e-5, atol=1e-6)
    for k in range(cfg.num_prompts):
        assert (grad[k].abs().max() > 0) == bool((pick == k).any()), k
    with pytest.raises(SPTError, match="--route"):
        SPTConfig(route=1.5).validate()
    # a run recorded before the field existed trained with the paper's plain mean
    assert SPTConfig.from_dict({"num_prompts": 4}).route == 0.0


def test_base_stays_frozen_and_only_spt_params_train(char_tok, tiny_llama):
    spt = SPTModel(tiny_llama, SPTConfig(num_prompts=2, prompt_len=2, layout="prefix"))
    trainable = {n for n, p in spt.named_parameters() if p.requires_grad}
    assert trainable == {"prompts.weight", "retriever.proj.weight", "retriever.proj.bias"}
    spt.train()
    assert not spt.base.training


def test_pt_baseline_has_lm_loss_only(char_tok, tiny_llama):
    cfg = SPTConfig.prompt_tuning(prompt_len=3, layout="prefix")
    spt = SPTModel(tiny_llama, cfg)
    out = spt(collate(_encode(char_tok, cfg), char_tok.pad_token_id, char_tok.bos_token_id))
    assert out["sel"] is None and out["fus"] is None and out["ctr"] is None
    assert out["loss"].item() == pytest.approx(out["lm"].item())


def test_prompt_inits(char_tok, tiny_llama):
    emb = tiny_llama.get_input_embeddings().weight
    v = SPTModel(tiny_llama, SPTConfig(num_prompts=2, prompt_len=3, init="vocab", layout="prefix")).prompts.weight
    # every row of a vocab init is some row of the embedding matrix
    assert all(((emb - row).abs().sum(-1) == 0).any() for row in v.reshape(-1, emb.shape[1]))
    r = SPTModel(tiny_llama, SPTConfig(num_prompts=4, prompt_len=8, init="random", layout="prefix")).prompts.weight
    assert r.std().item() == pytest.approx(emb.std().item(), rel=0.25)
    t = SPTModel(tiny_llama, SPTConfig(num_prompts=2, prompt_len=3, init="text", init_text="abc", layout="prefix"),
                 tokenizer=char_tok).prompts.weight
    ids = char_tok("abc", add_special_tokens=False).input_ids
    torch.testing.assert_close(t[0], emb[ids])
    assert not torch.equal(t[0], t[1])  # tie broken


@pytest.mark.parametrize("layout", ["prefix", "shared"])
def test_batched_generation_matches_one_row_at_a_time(layout, char_tok, tiny_llama):
    cfg = SPTConfig(num_prompts=3, prompt_len=2, layout=layout, init="random")
    spt = SPTModel(tiny_llama, cfg).eval()
    encoded = _encode(char_tok, cfg, with_response=False)
    pick = torch.tensor([2, 0, 1])  # a different prompt on every row
    batch = collate(encoded, char_tok.pad_token_id, char_tok.bos_token_id)
    texts, picks = generate_batch(spt, char_tok, batch, max_new_tokens=6, stops=("\n",), prompt_idx=pick)
    assert picks == [2, 0, 1]
    for b, e in enumerate(encoded):
        one = collate([e], char_tok.pad_token_id, char_tok.bos_token_id)
        t1, _ = generate_batch(spt, char_tok, one, max_new_tokens=6, stops=("\n",), prompt_idx=pick[b : b + 1])
        assert texts[b] == t1[0]
        # and the same continuation from a plain greedy loop over the full embedding sequence
        emb = spt.base.get_input_embeddings()
        ctx = emb(torch.tensor(e.context_ids))
        P = spt.prompts.weight[int(pick[b])]
        cut = len(e.context_ids) - e.tag_len  # shared: [context][P][ R:]
        x = torch.cat([P, ctx] if layout == "prefix" else [ctx[:cut], P, ctx[cut:]])[None]
        ids = []
        for _ in range(6):
            nxt = int(spt.base(inputs_embeds=x).logits[0, -1].argmax())
            if nxt == char_tok.eos_token_id:
                break
            ids.append(nxt)
            x = torch.cat([x, emb(torch.tensor([[nxt]]))], 1)
        expected = char_tok.decode(ids, skip_special_tokens=True).split("\n")[0].strip()
        assert t1[0] == expected


def test_generation_is_bounded_and_stops(char_tok, tiny_llama):
    cfg = SPTConfig(num_prompts=2, prompt_len=2, init="random", layout="prefix")
    spt = SPTModel(tiny_llama, cfg).eval()
    batch = collate(_encode(char_tok, cfg, with_response=False), char_tok.pad_token_id, char_tok.bos_token_id)
    texts, _ = generate_batch(spt, char_tok, batch, max_new_tokens=5, stops=("never-occurs",))
    assert all(len(t) <= 5 for t in texts)  # char tokenizer: one char per token


def test_activation_checkpointing_keeps_losses_and_gradients(char_tok, tiny_llama):
    """Shared layout: recomputing the branch layers in the backward changes no loss and no gradient
    (fp32, tight tolerance); the prefix layout refuses the option with a clear error."""
    from spt_fast.errors import SPTError
    from spt_fast.model.build import build_spt_model

    cfg = SPTConfig(num_prompts=3, prompt_len=2, init="random", layout="shared")
    spt = build_spt_model(tiny_llama, cfg)
    batch = collate(_encode(char_tok, cfg), char_tok.pad_token_id, char_tok.bos_token_id)
    results = []
    for on in (False, True):
        spt.set_activation_checkpointing(on)
        spt.zero_grad(set_to_none=True)
        out = spt(batch)
        out["loss"].backward()
        results.append((out["loss"].detach(), spt.prompts.weight.grad.clone(), spt.retriever.proj.weight.grad.clone()))
    for plain, recomputed in zip(*results):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)
    assert results[0][1].abs().sum() > 0
    with pytest.raises(SPTError, match="shared layout"):
        build_spt_model(tiny_llama, cfg.replace(layout="prefix")).set_activation_checkpointing(True)


@pytest.mark.parametrize("key_grad", [False, True])
def test_the_retrievers_losses_reach_the_prompts_only_with_key_grad(key_grad, char_tok, tiny_llama):
    """By default the selection and contrastive losses (functions of the scores alone) train W and
    leave the prompts to the LM and fusion CE; with key_grad (the paper) they move the prompts too."""
    cfg = SPTConfig(num_prompts=3, prompt_len=4, layout="shared", init="random", key_grad=key_grad)
    spt = SPTModel(tiny_llama, cfg)
    batch = collate(_encode(char_tok, cfg), char_tok.pad_token_id, char_tok.bos_token_id)
    parts = spt(batch)
    retriever_only = cfg.lambda_sel * parts["sel"] + cfg.lambda_ctr * parts["ctr"]
    g_prompts, g_w = torch.autograd.grad(retriever_only, [spt.prompts.weight, spt.retriever.proj.weight],
                                         allow_unused=True)
    assert g_w is not None and g_w.abs().max() > 0
    if key_grad:
        assert g_prompts is not None and g_prompts.abs().max() > 0
    else:
        assert g_prompts is None or g_prompts.abs().max() == 0


def test_the_pick_bias_moves_the_pick_not_the_scores(char_tok, tiny_llama):
    """The retriever's pick bias: its update goes against each prompt's share of the picks and sums
    to zero; it changes which prompt is picked (so where the routed LM loss goes, and what the
    engine serves) but not the scores the selection, fusion and contrastive losses see; a
    checkpoint keeps it, and one saved before it existed loads with a zero bias."""
    cfg = SPTConfig(num_prompts=3, prompt_len=4, layout="shared", init="random", route=1.0)
    spt = SPTModel(tiny_llama, cfg)
    bias = spt.retriever.pick_bias
    spt.retriever.update_pick_bias(torch.tensor([2, 0, 0]), 0.3)
    torch.testing.assert_close(bias, torch.tensor([0.3 * (1 / 3 - 1), 0.1, 0.1]))
    spt.retriever.update_pick_bias(torch.zeros(3), 0.3)  # a step without picks changes nothing
    assert abs(float(bias.sum())) < 1e-6 and float(bias[0]) == pytest.approx(-0.2)

    batch = collate(_encode(char_tok, cfg), char_tok.pad_token_id, char_tok.bos_token_id)
    bias.zero_()
    plain = spt(batch)
    loser = int(plain["scores"].mean(0).argmin())
    bias.zero_()[loser] = 10.0  # past any score difference (scores lie in [0, ~1])
    biased = spt(batch)
    torch.testing.assert_close(biased["scores"], plain["scores"])
    for name in ("sel", "fus", "ctr"):
        torch.testing.assert_close(biased[name], plain[name], msg=name)
    assert (biased["picks"] == loser).all() and (spt.select(batch) == loser).all()
    assert not (plain["picks"] == loser).all()
    n = batch.resp_len.float().clamp_min(1)
    routed = (biased["seq_ce_mean"][loser] * n).sum() / n.sum()
    torch.testing.assert_close(biased["lm"].detach(), routed, rtol=1e-5, atol=1e-6)

    state = spt.trainable_state_dict()
    again = SPTModel(tiny_llama, cfg)
    again.load_trainable_state_dict(state)
    torch.testing.assert_close(again.retriever.pick_bias, bias)
    again.load_trainable_state_dict({k: v for k, v in state.items() if k != "retriever.pick_bias"})
    assert (again.retriever.pick_bias == 0).all()
    # a run recorded before the field existed picked by the scores alone
    assert SPTConfig.from_dict({"num_prompts": 4}).balance_rate == 0.0
    with pytest.raises(SPTError, match="--balance-rate"):
        SPTConfig(balance_rate=-1.0).validate()


def test_the_retriever_breaks_ties_toward_the_lowest_index():
    """Equal scores (identical prompts) with an equal bias pick prompt 0 in every row, as the
    retrieval kernel ranks; a bias that puts prompt 2 ahead moves every row there."""
    from spt_fast.model.prompts import Retriever
    torch.manual_seed(0)
    retriever = Retriever(8, beta=1.0, threshold=20.0, num_prompts=4)
    prompts = torch.randn(1, 3, 8).expand(4, 3, 8).contiguous()
    ctx = torch.randn(5, 8)
    _, _, top = retriever(ctx, prompts, topk=2)
    assert top[:, 0].tolist() == [0] * 5 and top[:, 1].tolist() == [1] * 5
    retriever.pick_bias[2] = 0.01
    assert retriever(ctx, prompts)[2][:, 0].tolist() == [2] * 5
