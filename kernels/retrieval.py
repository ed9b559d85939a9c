"""Fused SPT retriever: pooled context features -> shared projection -> cosine -> softplus
-> log-softmax -> top-k, for B×K scores (DESIGN §1 "Retriever")."""
import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def pool_context_ref(embeds, lengths, start: int = 0):
    """Mean of embeds[b, start:lengths[b]] in fp32: x̄_b."""
    T = embeds.shape[1]
    pos = torch.arange(T, device=embeds.device)
    mask = (pos[None, :] >= start) & (pos[None, :] < lengths[:, None].to(embeds.device))
    total = (embeds.float() * mask[:, :, None]).sum(1)
    return total / mask.sum(1, keepdim=True).clamp_min(1)


def retrieval_ref(ctx_feat, prompts, weight, bias, beta: float = 10.0, threshold: float = 1.0,
                  tau: float = 1.0, topk: int = 1):
    keys = F.linear(prompts.float().mean(1), weight.float(), bias.float())  # [K, d]
    query = F.linear(ctx_feat.float(), weight.float(), bias.float())  # [B, d]
    cos = F.cosine_similarity(query[:, None, :], keys[None, :, :], dim=-1, eps=1e-8)
    scores = F.softplus(cos, beta=beta, threshold=threshold)
    log_q = F.log_softmax(scores / tau, dim=-1)
    top = torch.topk(scores.detach(), k=topk, dim=-1).indices
    return scores, log_q, top


def pool_context(embeds, lengths, start: int = 0):
    return pool_context_ref(embeds, lengths, start)


def retrieval(ctx_feat, prompts, weight, bias, beta: float = 10.0, threshold: float = 1.0, tau: float = 1.0,
              topk: int = 1):
    if use_triton(ctx_feat, prompts, weight):
        from .retrieval_triton import retrieval_triton

        return retrieval_triton(ctx_feat, prompts, weight, bias, beta, threshold, tau, topk)
    return retrieval_ref(ctx_feat, prompts, weight, bias, beta, threshold, tau, topk)
