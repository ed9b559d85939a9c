"""The K soft prompts and the retriever that picks one of them per context (DESIGN §1).

- `SoftPrompts`: P ∈ R^{K×L×d}, trainable, kept in fp32 whatever the base dtype.
- `Retriever`: one shared linear map W on both sides, s_{b,k} = softplus(cos(W p̄_k, W x̄_b)).
- `select_prompts`: the pick every path uses (training-time validation and the engine alike):
  top-1 of the scores, or the arg-max after optional Gaussian selection noise.
"""
import torch
import torch.nn as nn

from ..errors import SPTError
from ..kernels.retrieval import pool_context, retrieval


class SoftPrompts(nn.Module):
    """P ∈ R^{K×L×d}, kept in fp32 whatever the base dtype (cast at injection)."""

    def __init__(self, num_prompts, prompt_len, embedding: torch.Tensor, init="vocab", text_ids=None, seed=0):
        super().__init__()
        K, L, d = num_prompts, prompt_len, embedding.shape[1]
        g = torch.Generator().manual_seed(seed)
        vocab = embedding.detach().float().cpu()
        sigma = vocab.std().item()
        if init == "random":
            weight = torch.randn(K, L, d, generator=g) * sigma
        elif init == "normal":  # N(0, 1): what the authors' code gets from PEFT's nn.Embedding
            weight = torch.randn(K, L, d, generator=g)
        elif init == "vocab":
            rows = torch.randint(0, vocab.shape[0], (K * L,), generator=g)
            weight = vocab[rows].reshape(K, L, d).clone()
        else:
            if not text_ids:
                raise SPTError("init 'text': the init text tokenizes to nothing")
            rows = torch.tensor([text_ids[i % len(text_ids)] for i in range(L)])
            weight = vocab[rows].unsqueeze(0).repeat(K, 1, 1)
            # Identical prompts would get identical keys and gradients: break the tie slightly.
            weight[1:] += 0.01 * sigma * torch.randn(K - 1, L, d, generator=g)
        self.weight = nn.Parameter(weight.to(embedding.device))


RETRIEVERS = ("centered", "paper")


class Retriever(nn.Module):
    """One shared linear map W on both sides, s_{b,k} = softplus(cos(W p̄_k + b, W x̄_b + b)).

    mode "paper": exactly that, on the raw pooled features. mode "centered" (the default): the
    context features are first standardised with statistics of the training corpus,
    x̄ -> (x̄ - mean) / spread: raw pooled embeddings of different contexts point almost the same
    way, so every context ranked the prompts alike and the pick collapsed to one prompt (README,
    "Quality study"). The statistics are fixed before training (fit_context_statistics) and
    saved with the checkpoint; they are not trained.

    pick_bias [K]: added to the scores where a prompt is picked (top-1), never where the scores
    enter a loss. Training moves it against each prompt's share of the picks (update_pick_bias),
    so a prompt the LM loss routes to more and more cannot take every context (after the
    auxiliary-loss-free balancing of DeepSeek-V3's router, which steps by the sign of the gap; here
    the step is proportional to it; README, "Quality study"). Zero: the scores alone pick.
    """

    def __init__(self, dim: int, beta: float, threshold: float, mode: str = "centered", num_prompts: int = 1):
        super().__init__()
        if mode not in RETRIEVERS:
            raise SPTError(f"retriever must be one of {RETRIEVERS}, got {mode!r}")
        self.proj = nn.Linear(dim, dim)
        self.beta, self.threshold, self.mode = beta, threshold, mode
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("pick_bias", torch.zeros(num_prompts))

    @torch.no_grad()
    def update_pick_bias(self, counts: torch.Tensor, rate: float) -> None:
        """One balancing step from this step's pick counts [K]: b_k += rate * (1/K - share_k).
        The update sums to zero, so the bias stays centred and only differences between prompts,
        which are all a top-1 pick sees, move."""
        total = counts.sum()
        if rate <= 0 or total <= 0:
            return
        share = counts.to(self.pick_bias) / total
        self.pick_bias.add_(rate * (1.0 / share.numel() - share))

    @torch.no_grad()
    def set_statistics(self, feats: torch.Tensor) -> None:
        """Centre on the mean of these pooled features [N, d]; scale so their deviations have an
        RMS norm of 1 (comparable to W's bias, so neither drowns the other)."""
        feats = feats.float()
        self.center.copy_(feats.mean(0))
        spread = (feats - self.center).norm(dim=1).pow(2).mean().sqrt()
        self.scale.copy_(spread.clamp_min(1e-6))

    def features(self, ctx_feat: torch.Tensor) -> torch.Tensor:
        feat = ctx_feat.float()
        return feat if self.mode == "paper" else (feat - self.center) / self.scale

    def forward(self, ctx_feat, prompts, tau: float = 1.0, topk: int = 1):
        """(scores [B, K], log_q [B, K], top [B, topk]) for pooled context features [B, d]; top
        ranks scores + pick_bias."""
        scores, log_q, _ = retrieval(self.features(ctx_feat), prompts, self.proj.weight, self.proj.bias,
                                     beta=self.beta, threshold=self.threshold, tau=tau, topk=topk)
        # Always re-rank (a [B, K] add): asking whether the bias is zero would wait on the GPU. A
        # stable sort keeps the kernel's rule (ties -> lowest index); torch.topk promises no order.
        ranked = scores.detach().float() + self.pick_bias
        top = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[:, :topk]
        return scores, log_q, top


def context_features(embeds: torch.Tensor, ctx_len: torch.Tensor, has_bos: bool) -> torch.Tensor:
    """x̄_b: mean frozen input embedding over the context tokens (bos excluded when present)."""
    return pool_context(embeds, ctx_len, 1 if has_bos else 0)


@torch.no_grad()
def select_prompts(retriever: Retriever, prompts: torch.Tensor, embeds: torch.Tensor, ctx_len: torch.Tensor,
                   has_bos: bool, tau: float = 1.0, noise: float = 0.0, generator=None) -> torch.Tensor:
    """Index of the soft prompt each row uses, [B]: top-1 of the retriever's scores, or with
    Gaussian selection noise (std `noise`, drawn on the CPU from `generator`) added first."""
    B = embeds.shape[0]
    if prompts.shape[0] == 1:
        return torch.zeros(B, dtype=torch.long, device=embeds.device)
    scores, _, top = retriever(context_features(embeds, ctx_len, has_bos), prompts, tau=tau)
    if noise > 0:
        jitter = torch.randn(scores.shape, generator=generator, device="cpu").to(scores.device)
        return (scores.float() + retriever.pick_bias + noise * jitter).argmax(-1)
    return top[:, 0]
