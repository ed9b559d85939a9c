"""Selective Prompt Tuning on a frozen causal LM: K soft prompts, the retriever, the four losses.

The generic path works on any Hugging Face causal LM through `inputs_embeds`: all K prompts run as
one batched K·B forward (row n = k·B + b), only response positions reach the LM head, and the LM
and prompt-fusion losses come from one fused linear + cross-entropy op. The prefix layout puts
the prompt first, `[P_k][context][response]`; the shared layout puts it after the context,
`[context][P_k][response]` (the compact-Llama engine runs that layout without repeating the context).
"""
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from .errors import SPTError
from .kernels.fused_ce import fused_linear_ce
from .kernels.inject import inject_prompts
from .kernels.retrieval import pool_context, retrieval
from . import losses

LAYOUTS = ("prefix", "shared", "auto")  # auto: resolved by engine.build_spt_model
INITS = ("random", "vocab", "text")


@dataclass
class SPTConfig:
    num_prompts: int = 4
    prompt_len: int = 8
    init: str = "vocab"
    init_text: str | None = None
    layout: str = "prefix"
    lambda_sel: float = 0.4
    lambda_ctr: float = 0.4
    tau_gold: float = 1.0
    tau_sim: float = 1.0
    use_sel: bool = True
    use_fus: bool = True
    use_ctr: bool = True
    bleu_threshold: float = 20.0
    max_len: int = 512
    seed: int = 0

    def validate(self) -> "SPTConfig":
        if self.num_prompts < 1:
            raise SPTError(f"num_prompts (K) must be >= 1, got {self.num_prompts}")
        if self.prompt_len < 1:
            raise SPTError(f"prompt_len (L) must be >= 1, got {self.prompt_len}")
        if self.layout not in LAYOUTS:
            raise SPTError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.init not in INITS:
            raise SPTError(f"init must be one of {INITS}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise SPTError("init 'text' needs init_text")
        if self.max_len <= self.prompt_len + 2:
            raise SPTError(f"max_len {self.max_len} leaves no room after {self.prompt_len} prompt tokens")
        return self

    @property
    def uses_retriever(self) -> bool:
        return self.num_prompts > 1 or self.use_fus

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def prompt_tuning(cls, prompt_len: int = 8, **kw) -> "SPTConfig":
        """The PT baseline: one soft prompt, LM loss only."""
        return cls(num_prompts=1, prompt_len=prompt_len, use_sel=False, use_fus=False, use_ctr=False, **kw)


@dataclass
class Batch:
    """A dynamically padded batch: context+response token ids, right-padded."""

    input_ids: torch.Tensor  # [B, T]
    ctx_len: torch.Tensor  # [B]
    resp_len: torch.Tensor  # [B]
    targets: torch.Tensor  # [B, R], -100 beyond resp_len
    persona_keys: list
    turns: list
    has_bos: bool

    def to(self, device) -> "Batch":
        for name in ("input_ids", "ctx_len", "resp_len", "targets"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def collate(encoded: list, pad_id: int, bos_id: int | None) -> Batch:
    B = len(encoded)
    ctx = [e.context_ids for e in encoded]
    resp = [e.response_ids for e in encoded]
    T = max(len(c) + len(r) for c, r in zip(ctx, resp))
    R = max(1, max(len(r) for r in resp))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, R), -100, dtype=torch.long)
    for b, (c, r) in enumerate(zip(ctx, resp)):
        ids[b, : len(c) + len(r)] = torch.tensor(c + r, dtype=torch.long)
        if r:
            targets[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return Batch(
        input_ids=ids,
        ctx_len=torch.tensor([len(c) for c in ctx], dtype=torch.long),
        resp_len=torch.tensor([len(r) for r in resp], dtype=torch.long),
        targets=targets,
        persona_keys=[e.persona_key for e in encoded],
        turns=[e.turn for e in encoded],
        has_bos=bool(bos_id is not None and all(c and c[0] == bos_id for c in ctx)),
    )


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


class Retriever(nn.Module):
    """The paper's retriever: one shared linear map W on both sides, softplus(cos) scores."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, ctx_feat, prompts, tau: float = 1.0, topk: int = 1):
        return retrieval(ctx_feat.float(), prompts, self.proj.weight, self.proj.bias, tau=tau, topk=topk)


class SPTModel(nn.Module):
    def __init__(self, base: nn.Module, config: SPTConfig, tokenizer=None):
        super().__init__()
        config.validate()
        self.config = config
        self.base = base
        self.base.requires_grad_(False)
        emb = base.get_input_embeddings().weight
        text_ids = None
        if config.init == "text":
            if tokenizer is None:
                raise SPTError("init 'text' needs the tokenizer")
            text_ids = tokenizer(config.init_text, add_special_tokens=False).input_ids
        self.prompts = SoftPrompts(config.num_prompts, config.prompt_len, emb, config.init, text_ids, config.seed)
        self.retriever = Retriever(emb.shape[1]).to(emb.device)
        self._pair_cache: dict = {}

    # ---- parameters that train and get saved -------------------------------------------------
    def trainable_state_dict(self) -> dict:
        return {
            "prompts": self.prompts.weight.detach().contiguous(),
            "retriever.weight": self.retriever.proj.weight.detach().contiguous(),
            "retriever.bias": self.retriever.proj.bias.detach().contiguous(),
        }

    def load_trainable_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        want = self.trainable_state_dict()
        for name, tensor in want.items():
            if name not in state:
                raise SPTError(f"{source}: missing tensor '{name}'")
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise SPTError(
                    f"{source}: tensor '{name}' has shape {tuple(state[name].shape)} but this model needs "
                    f"{tuple(tensor.shape)} (K, L or the model width differ)"
                )
        with torch.no_grad():
            self.prompts.weight.copy_(state["prompts"])
            self.retriever.proj.weight.copy_(state["retriever.weight"])
            self.retriever.proj.bias.copy_(state["retriever.bias"])

    def train(self, mode: bool = True):
        # The frozen base stays in eval mode (no dropout on a model we do not train).
        super().train(mode)
        self.base.eval()
        return self

    # ---- pieces -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.base.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.prompts.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.base.get_input_embeddings()(ids)

    def context_features(self, embeds: torch.Tensor, batch: Batch) -> torch.Tensor:
        """x̄_b: mean frozen input embedding over the context tokens (bos excluded when present)."""
        start = 1 if batch.has_bos else 0
        return pool_context(embeds, batch.ctx_len, start)

    def scores(self, embeds: torch.Tensor, batch: Batch):
        feat = self.context_features(embeds, batch)
        return self.retriever(feat, self.prompts.weight, tau=self.config.tau_sim)

    def pair_labels(self, persona_keys: list) -> torch.Tensor:
        """y_ij = +1 when sentence BLEU(persona_i, persona_j) > threshold, else −1 (cached per pair)."""
        from .metrics import sentence_bleu

        B = len(persona_keys)
        y = -torch.ones(B, B)
        for i in range(B):
            for j in range(i + 1, B):
                key = (persona_keys[i], persona_keys[j])
                if key not in self._pair_cache:
                    bleu = sentence_bleu(key[0], key[1]) if key[0] and key[1] else 0.0
                    self._pair_cache[key] = 1.0 if bleu > self.config.bleu_threshold else -1.0
                y[i, j] = self._pair_cache[key]
        return y

    def _response_hidden(self, batch: Batch, embeds: torch.Tensor, prompt_idx: torch.Tensor):
        """Hidden states that predict each response target, for every row: [N//B, B, R, d]."""
        B = batch.input_ids.shape[0]
        N = prompt_idx.shape[0]
        L = self.config.prompt_len
        row_src = torch.arange(N, device=embeds.device) % B
        if self.config.layout == "prefix":
            pos = torch.zeros(N, dtype=torch.long, device=embeds.device)
        else:
            pos = batch.ctx_len[row_src]
        rows = inject_prompts(embeds, self.prompts.weight.to(embeds.dtype), row_src, prompt_idx, pos)
        # Right padding + causal attention: real tokens never see padding, and position ids are
        # the same as unpadded, so no attention mask is needed (keeps SDPA on its causal path).
        hidden = self.base.base_model(inputs_embeds=rows, use_cache=False).last_hidden_state
        # In both layouts the response starts at L + ctx_len; target t is predicted one step earlier.
        R = batch.targets.shape[1]
        t = torch.arange(R, device=embeds.device)
        where = (L + batch.ctx_len[:, None] - 1 + t[None, :]).clamp_max(hidden.shape[1] - 1)  # [B, R]
        hidden = hidden.view(N // B, B, hidden.shape[1], hidden.shape[2])
        index = where[None, :, :, None].expand(N // B, B, R, hidden.shape[-1])
        return torch.gather(hidden, 2, index)

    # ---- training forward -----------------------------------------------------------------------
    def forward(self, batch: Batch) -> dict:
        cfg = self.config
        K, B = cfg.num_prompts, batch.input_ids.shape[0]
        embeds = self.embed(batch.input_ids)
        scores = None
        if cfg.uses_retriever:
            scores, _, _ = self.scores(embeds, batch)
        prompt_idx = torch.arange(K * B, device=embeds.device) // B
        hidden = self._response_hidden(batch, embeds, prompt_idx)
        head = self.base.get_output_embeddings()
        seq_ce_sum, fusion = fused_linear_ce(
            hidden, head.weight, head.bias, batch.targets, scores if cfg.use_fus else None
        )
        n_tokens = batch.resp_len.to(seq_ce_sum.device).clamp_min(1)
        seq_ce_mean = seq_ce_sum / n_tokens[None, :]
        parts = {"lm": losses.lm_loss(seq_ce_sum, batch.resp_len.to(seq_ce_sum.device)), "fus": fusion}
        parts["sel"] = (
            losses.selection_loss(seq_ce_mean, scores, cfg.tau_gold, cfg.tau_sim)
            if cfg.use_sel and scores is not None else None
        )
        parts["ctr"] = (
            losses.contrastive_loss(scores, self.pair_labels(batch.persona_keys).to(scores.device))
            if cfg.use_ctr and scores is not None else None
        )
        parts["loss"] = losses.combine(parts, cfg.lambda_sel, cfg.lambda_ctr)
        parts["seq_ce_mean"] = seq_ce_mean.detach()
        parts["scores"] = None if scores is None else scores.detach()
        return parts

    @torch.no_grad()
    def select(self, batch: Batch, noise: float = 0.0, generator=None) -> torch.Tensor:
        """Top-1 prompt per row (optional Gaussian selection noise for diversity)."""
        B = batch.input_ids.shape[0]
        if self.config.num_prompts == 1:
            return torch.zeros(B, dtype=torch.long, device=batch.input_ids.device)
        embeds = self.embed(batch.input_ids)
        scores, _, top = self.scores(embeds, batch)
        if noise > 0:
            jitter = torch.randn(scores.shape, generator=generator, device="cpu").to(scores.device)
            return (scores + noise * jitter).argmax(-1)
        return top[:, 0]

    @torch.no_grad()
    def eval_losses(self, batch: Batch) -> dict:
        """Validation: CE under the retriever's pick, under the best prompt (oracle), and the LM loss."""
        K, B = self.config.num_prompts, batch.input_ids.shape[0]
        out = self.forward(batch)
        ce = out["seq_ce_mean"]  # [K, B]
        pick = self.select(batch)
        n = batch.resp_len.to(ce.device).float()
        picked = ce.gather(0, pick[None, :].to(ce.device))[0]
        best = ce.min(0).values
        return {
            "lm": float(out["lm"]),
            "selected_ce_sum": float((picked * n).sum()),
            "oracle_ce_sum": float((best * n).sum()),
            "n_tokens": float(n.sum()),
            "picks": pick.tolist(),
        }
