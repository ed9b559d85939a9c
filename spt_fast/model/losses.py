"""The four SPT losses (DESIGN §1), as plain functions of per-sequence losses and scores."""
import torch
import torch.nn.functional as F


def lm_loss(seq_ce_sum: torch.Tensor, n_tokens: torch.Tensor, total_tokens: torch.Tensor | None = None,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Token-weighted mean CE over all K·B sequences; seq_ce_sum [K,B], n_tokens [B]. With
    total_tokens (of a global batch spread over processes) this is this batch's share of it.
    weights [K,B] (each column summing to 1) share each sample's loss among the K prompts; None
    is the paper's plain mean, 1/K each."""
    K = seq_ce_sum.shape[0]
    total = n_tokens.sum() if total_tokens is None else total_tokens
    if weights is None:
        return seq_ce_sum.sum() / (K * total).clamp_min(1)
    return (weights.to(seq_ce_sum.dtype) * seq_ce_sum).sum() / total.clamp_min(1)


def routed_weights(scores: torch.Tensor | None, route: float, pick: torch.Tensor | None = None) -> torch.Tensor | None:
    """[K,B] LM-loss weights: `route` of each sample's share on the prompt the retriever picks
    (`pick` [B], by default its top score; not differentiated), the rest spread evenly over the K
    prompts. None (lm_loss's plain mean) where nothing is routed: route 0, one prompt, or no scores."""
    if scores is None or route <= 0 or scores.shape[1] == 1:
        return None
    K = scores.shape[1]
    pick = scores.detach().argmax(-1) if pick is None else pick
    return (1.0 - route) / K + route * F.one_hot(pick, K).t().to(scores.dtype)


def selection_loss(seq_ce_mean: torch.Tensor, scores: torch.Tensor, tau_gold: float = 1.0,
                   tau_sim: float = 1.0, target_noise: float = 0.0) -> torch.Tensor:
    """mean_b KL(π_b ‖ q_b), π = softmax(−ℓ/τ_gold) detached, q = softmax(s/τ_sim).

    seq_ce_mean [K,B] (mean CE of each prompt on each sample), scores [B,K]. target_noise > 0 adds
    N(0, target_noise²) to π, as the authors' Llama-2 configuration does; they leave π
    unnormalised, where a negative entry makes the KL NaN, so here it is clipped at 0 and
    renormalised (a deviation listed in README).
    """
    log_pi = F.log_softmax(-seq_ce_mean.detach().t() / tau_gold, dim=-1)
    log_q = F.log_softmax(scores / tau_sim, dim=-1)
    if target_noise > 0:
        pi = (log_pi.exp() + target_noise * torch.randn_like(log_pi)).clamp_min(0)
        pi = pi / pi.sum(-1, keepdim=True).clamp_min(1e-12)
        kl = (torch.xlogy(pi, pi) - pi * log_q).sum(-1)
    else:
        kl = (log_pi.exp() * (log_pi - log_q)).sum(-1)
    return kl.mean()


def contrastive_loss(scores: torch.Tensor, pair_labels: torch.Tensor) -> torch.Tensor:
    """mean over pairs i<j of CosineEmbeddingLoss(s_i, s_j, y_ij), margin 0.

    scores [B,K]; pair_labels [B,B] of ±1 (only the upper triangle is read). Zero for B < 2.
    """
    B = scores.shape[0]
    if B < 2:
        return scores.sum() * 0.0
    i, j = torch.triu_indices(B, B, offset=1, device=scores.device)
    return F.cosine_embedding_loss(scores[i], scores[j], pair_labels[i, j].to(scores.dtype), margin=0.0)


def combine(parts: dict, lambda_sel: float, lambda_ctr: float) -> torch.Tensor:
    """L = L_LM + λ_sel·L_sel + L_fus + λ_ctr·L_ctr, over whichever parts are present."""
    total = parts["lm"]
    if parts.get("sel") is not None:
        total = total + lambda_sel * parts["sel"]
    if parts.get("fus") is not None:
        total = total + parts["fus"]
    if parts.get("ctr") is not None:
        total = total + lambda_ctr * parts["ctr"]
    return total
