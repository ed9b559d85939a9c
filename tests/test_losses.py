"""Each SPT loss against a tiny example computed by hand (DESIGN §1)."""
import math

import pytest
import torch
import torch.nn.functional as F

from spt_fast.model import losses
from spt_fast.kernels.fused_ce import fused_linear_ce
from spt_fast.kernels.retrieval import retrieval


def test_lm_loss_is_token_weighted_over_all_sequences():
    seq_ce_sum = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # K=2, B=2
    n_tokens = torch.tensor([2, 3])
    # (1+2+3+4) / (K * (2+3)) = 10 / 10
    assert losses.lm_loss(seq_ce_sum, n_tokens).item() == pytest.approx(1.0)


def test_routed_lm_loss_weights_the_retrievers_pick():
    seq_ce_sum = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # K=3, B=2
    n_tokens = torch.tensor([2, 3])
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.4]], requires_grad=True)  # picks: 1, 0
    w = losses.routed_weights(scores, 0.7)
    assert w.shape == (3, 2) and not w.requires_grad
    torch.testing.assert_close(w.sum(0), torch.ones(2))
    torch.testing.assert_close(w[:, 0], torch.tensor([0.1, 0.8, 0.1]))
    torch.testing.assert_close(w[:, 1], torch.tensor([0.8, 0.1, 0.1]))
    # sample 0: 0.1*1 + 0.8*3 + 0.1*5 = 3.0; sample 1: 0.8*2 + 0.1*4 + 0.1*6 = 2.6; over 5 tokens
    assert losses.lm_loss(seq_ce_sum, n_tokens, weights=w).item() == pytest.approx(5.6 / 5)
    # route 0 is the paper's plain mean
    assert losses.lm_loss(seq_ce_sum, n_tokens, weights=losses.routed_weights(scores, 0.0)).item() == \
        pytest.approx(losses.lm_loss(seq_ce_sum, n_tokens).item())


def test_selection_loss_kl_of_gold_against_retriever():
    seq_ce_mean = torch.tensor([[1.0], [2.0]])  # K=2, B=1
    scores = torch.tensor([[0.5, 0.2]])
    pi = [math.exp(-1) / (math.exp(-1) + math.exp(-2)), math.exp(-2) / (math.exp(-1) + math.exp(-2))]
    q = [math.exp(0.5) / (math.exp(0.5) + math.exp(0.2)), math.exp(0.2) / (math.exp(0.5) + math.exp(0.2))]
    expected = sum(p * math.log(p / qq) for p, qq in zip(pi, q))
    assert losses.selection_loss(seq_ce_mean, scores).item() == pytest.approx(expected, rel=1e-5)


def test_selection_loss_target_is_detached_and_temperatures_apply():
    seq = torch.tensor([[1.0, 0.3], [2.0, 0.1]], requires_grad=True)
    scores = torch.tensor([[0.5, 0.2], [0.1, 0.9]], requires_grad=True)
    loss = losses.selection_loss(seq, scores, tau_gold=2.0, tau_sim=0.5)
    loss.backward()
    assert seq.grad is None or torch.all(seq.grad == 0)
    pi = F.softmax(-seq.detach().t() / 2.0, -1)
    q = F.softmax(scores.detach() / 0.5, -1)
    assert loss.item() == pytest.approx(float((pi * (pi / q).log()).sum(-1).mean()), rel=1e-5)


def test_contrastive_loss_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([[0, -1, 1], [0, 0, -1], [0, 0, 0]])
    # pairs: (0,1) y=-1 cos=0 -> 0; (0,2) y=+1 -> 1-cos45; (1,2) y=-1 -> cos45
    c = 1 / math.sqrt(2)
    expected = (0.0 + (1 - c) + c) / 3
    assert losses.contrastive_loss(s, y).item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_loss_single_sample_is_zero():
    assert losses.contrastive_loss(torch.rand(1, 4), torch.ones(1, 1)).item() == 0.0


def test_fusion_loss_by_hand():
    # K=2 prompts, B=1, T=1, V=d=2, identity head: logits equal the hidden states.
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 1, 1, 2)
    weight = torch.eye(2)
    targets = torch.tensor([[0]])
    scores = torch.tensor([[0.5, 0.25]])  # fused logits: [0.5, 0.25], not renormalised
    _, fusion = fused_linear_ce(hidden, weight, None, targets, scores)
    expected = math.log(1 + math.exp(0.25 - 0.5))
    assert fusion.item() == pytest.approx(expected, rel=1e-5)


def test_fusion_loss_with_bias_and_padding():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 1, 1, 2).repeat(1, 1, 2, 1)
    bias = torch.tensor([0.1, -0.1])
    targets = torch.tensor([[1, -100]])  # second position is padding
    scores = torch.tensor([[0.5, 0.25]])
    seq, fusion = fused_linear_ce(hidden, torch.eye(2), bias, targets, scores)
    fused = torch.tensor([0.5 + 0.75 * 0.1, 0.25 - 0.75 * 0.1])  # (Σ s) * bias
    assert fusion.item() == pytest.approx(float(-F.log_softmax(fused, -1)[1]), rel=1e-5)
    # per-sequence CE sums ignore padding: prompt 0 logits [1.1, -0.1] on target 1
    assert seq[0, 0].item() == pytest.approx(float(-F.log_softmax(torch.tensor([1.1, -0.1]), -1)[1]), rel=1e-5)


def test_retriever_score_softplus_of_cosine():
    d = 2
    ctx = torch.tensor([[1.0, 0.0]])
    prompts = torch.tensor([[[1.0, 1.0]], [[-1.0, 0.0]]])  # K=2, L=1
    scores, log_q, top = retrieval(ctx, prompts, torch.eye(d), torch.zeros(d), beta=10.0, threshold=1.0)
    c = 1 / math.sqrt(2)
    # softplus(beta=10, threshold=1): linear above x=0.1, log(1+exp(10x))/10 below
    assert scores[0, 0].item() == pytest.approx(c, rel=1e-6)
    assert scores[0, 1].item() == pytest.approx(math.log1p(math.exp(-10.0)) / 10, rel=1e-4)
    assert top[0, 0].item() == 0
    assert torch.allclose(log_q, F.log_softmax(scores, -1))


def test_combine_weights():
    parts = {"lm": torch.tensor(1.0), "sel": torch.tensor(2.0), "fus": torch.tensor(3.0), "ctr": torch.tensor(4.0)}
    assert losses.combine(parts, 0.4, 0.5).item() == pytest.approx(1 + 0.8 + 3 + 2.0)
    assert losses.combine({"lm": torch.tensor(1.0), "sel": None, "fus": None, "ctr": None}, 1, 1).item() == 1.0


def test_routed_lm_loss_follows_a_given_pick():
    # the retriever's pick bias can move the pick away from the top score: the weights follow it
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.4]])
    w = losses.routed_weights(scores, 1.0, torch.tensor([2, 2]))
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
