"""Fused linear + cross-entropy on response positions: per-sequence CE sums for K×B sequences and
the prompt-fusion loss, without K×B×T×V logits on the Triton path."""
import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def fused_linear_ce_ref(hidden, weight, bias, targets, scores=None):
    """seq_ce_sum [K,B] and the fusion loss mean_b mean_t CE(Σ_k s_bk z_kbt, y_bt) (or None)."""
    K, B, T, d = hidden.shape
    valid = targets != -100
    safe = targets.clamp_min(0)
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())  # [K,B,T,V]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), safe.expand(K, B, T).reshape(-1), reduction="none")
    seq = (ce.view(K, B, T) * valid).sum(-1)
    fusion = None
    if scores is not None:
        s = scores.float().t()  # [K, B]
        fused = (s[:, :, None, None] * logits).sum(0)  # [B,T,V]; linear head: = W(Σ s h) + (Σ s) b
        ce_f = F.cross_entropy(fused.reshape(-1, fused.shape[-1]), safe.reshape(-1), reduction="none").view(B, T)
        per_b = (ce_f * valid).sum(-1) / valid.sum(-1).clamp_min(1)
        fusion = per_b[valid.any(-1)].mean() if valid.any() else per_b.sum() * 0.0
    return seq, fusion


def fused_linear_ce(hidden, weight, bias, targets, scores=None):
    if use_triton(hidden, weight):
        from .fused_ce_triton import fused_linear_ce_triton

        return fused_linear_ce_triton(hidden, weight, bias, targets, scores)
    return fused_linear_ce_ref(hidden, weight, bias, targets, scores)


def fused_linear_ce_losses(hidden, weight, bias, targets, scores=None) -> dict:
    seq, fusion = fused_linear_ce(hidden, weight, bias, targets, scores)
    n = (targets != -100).sum(-1)
    K = hidden.shape[0]
    return {"seq_ce_sum": seq, "n_tokens": n, "seq_ce_mean": seq / n.clamp_min(1)[None, :],
            "token_mean": seq.sum() / (K * n.sum()).clamp_min(1), "fusion": fusion}
