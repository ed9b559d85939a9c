"""Selective Prompt Tuning on a frozen causal LM: the configuration and the batched K·B forward.

The generic path works on any Hugging Face causal LM through `inputs_embeds`: all K prompts run as
one batched K·B forward (row n = k·B + b), only response positions reach the LM head, and the LM
and prompt-fusion losses come from one fused linear + cross-entropy op. Where the prompt goes in
each row is the layout's rule (model.layouts); the shared-context engine (model.shared) runs the
layouts that share the context without repeating it.
"""
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn

from ..data.batch import Batch
from ..data.pairs import PersonaPairs
from ..errors import SPTError
from ..utils import check_number
from ..kernels.fused_ce import fused_linear_ce
from ..kernels.inject import inject_prompts
from . import losses
from .layouts import AUTO, get_layout, prompt_positions
from .prompts import RETRIEVERS, Retriever, SoftPrompts, context_features, select_prompts

INITS = ("random", "vocab", "text", "normal")
# Settings that configs written before a field existed meant (SPTConfig.from_dict fills them in).
_LEGACY = {"retriever": "paper", "route": 0.0, "lambda_ctr": 0.4, "key_grad": True, "balance_rate": 0.0}


@dataclass
class SPTConfig:
    num_prompts: int = 4
    prompt_len: int = 8
    init: str = "vocab"
    init_text: str | None = None
    layout: str = "auto"  # shared where the model is a Llama, else prefix (README, "Quality study")
    lambda_sel: float = 0.4
    lambda_ctr: float = 1.0  # paper: 0.4 for OPT, 1.0 for Llama-2; 1.0 keeps routed picks spread (README)
    tau_gold: float = 0.03  # paper: 1; sharper target so the retriever learns to choose (README)
    tau_sim: float = 1.0
    target_noise: float = 0.0  # std of Gaussian noise on the selection target (authors' Llama-2 run: 0.1)
    use_sel: bool = True
    use_fus: bool = True
    use_ctr: bool = True
    bleu_threshold: float = 20.0
    score_beta: float = 10.0  # the retriever's softplus(cos, beta, threshold), PyTorch semantics
    score_threshold: float = 1.0
    retriever: str = "centered"  # "paper": W on the raw pooled features; see model.prompts.Retriever
    route: float = 1.0  # share of a sample's LM loss on the retriever's pick; 0: the paper's mean over K (README)
    # Whether the retriever's scores pass gradients into the prompts through their keys (the mean
    # of each prompt's rows), as in the paper. Off: the selection, fusion and contrastive losses
    # move W, not the prompts, whose LM behaviour then answers to the LM and fusion CE alone: with
    # it on, prompts drifted to put end-of-turn first (empty replies; README, Quality study).
    key_grad: bool = False
    # Step size of the retriever's pick bias (model.prompts.Retriever.pick_bias), which moves
    # against each prompt's share of the training picks; 0: the scores alone pick (the paper).
    # Routed, a prompt that wins early trains on more contexts and wins more: in one seed of three
    # 87% of held-out contexts went to one prompt (README, Quality study).
    balance_rate: float = 0.003
    max_len: int = 512
    seed: int = 0

    def validate(self) -> "SPTConfig":
        if self.num_prompts < 1:
            raise SPTError(f"num_prompts (K) must be >= 1, got {self.num_prompts}")
        if self.prompt_len < 1:
            raise SPTError(f"prompt_len (L) must be >= 1, got {self.prompt_len}")
        if self.layout != AUTO:
            get_layout(self.layout)  # an unknown name is an SPTError listing the known ones
        if self.init not in INITS:
            raise SPTError(f"init must be one of {INITS}, got {self.init!r}")
        if self.retriever not in RETRIEVERS:
            raise SPTError(f"retriever must be one of {RETRIEVERS}, got {self.retriever!r}")
        if self.init == "text" and not self.init_text:
            raise SPTError("init 'text' needs init_text")
        for name in ("lambda_sel", "lambda_ctr", "target_noise", "balance_rate"):
            check_number(f"--{name.replace('_', '-')}", getattr(self, name), strict=False)
        check_number("--route", self.route, strict=False)
        if self.route > 1:
            raise SPTError(f"--route is a share of the LM loss, between 0 and 1, got {self.route!r}")
        for name in ("tau_gold", "tau_sim"):
            check_number(f"--{name.replace('_', '-')}", getattr(self, name))
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
        return cls(**{**_LEGACY, **{k: v for k, v in d.items() if k in known}})

    @classmethod
    def prompt_tuning(cls, prompt_len: int = 8, **kw) -> "SPTConfig":
        """The PT baseline: one soft prompt, LM loss only."""
        return cls(num_prompts=1, prompt_len=prompt_len, use_sel=False, use_fus=False, use_ctr=False, **kw)

    def replace(self, **changes) -> "SPTConfig":
        """A copy with some fields changed (configs handed to a function are never mutated)."""
        return replace(self, **changes)


class SPTModel(nn.Module):
    """SPT on any Hugging Face causal LM: one batched K·B forward through `inputs_embeds`."""

    def __init__(self, base: nn.Module, config: SPTConfig, tokenizer=None):
        super().__init__()
        config.validate()
        if config.layout == AUTO:
            raise SPTError("layout 'auto' must be resolved first (spt_fast.model.build.build_spt_model)")
        self.config = config
        self.layout = get_layout(config.layout)
        self.base = base
        self.base.requires_grad_(False)
        emb = base.get_input_embeddings().weight
        text_ids = None
        if config.init == "text":
            if tokenizer is None:
                raise SPTError("init 'text' needs the tokenizer")
            text_ids = tokenizer(config.init_text, add_special_tokens=False).input_ids
        self.prompts = SoftPrompts(config.num_prompts, config.prompt_len, emb, config.init, text_ids, config.seed)
        self.retriever = Retriever(emb.shape[1], config.score_beta, config.score_threshold,
                                   config.retriever, config.num_prompts).to(emb.device)
        self.pairs = PersonaPairs(config.bleu_threshold)

    # ---- parameters that train and get saved -------------------------------------------------
    def trainable_state_dict(self) -> dict:
        """What a checkpoint holds: the trained tensors and the retriever's feature statistics."""
        return {
            "prompts": self.prompts.weight.detach().contiguous(),
            "retriever.weight": self.retriever.proj.weight.detach().contiguous(),
            "retriever.bias": self.retriever.proj.bias.detach().contiguous(),
            "retriever.center": self.retriever.center.detach().contiguous(),
            "retriever.scale": self.retriever.scale.detach().contiguous(),
            "retriever.pick_bias": self.retriever.pick_bias.detach().contiguous(),
        }

    def load_trainable_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        want = self.trainable_state_dict()
        if self.config.retriever == "paper":  # checkpoints from before the statistics existed
            state = {"retriever.center": want["retriever.center"], "retriever.scale": want["retriever.scale"],
                     **state}
        # Checkpoints from before the pick bias existed picked by the scores alone: a zero bias.
        state = {"retriever.pick_bias": torch.zeros_like(want["retriever.pick_bias"]), **state}
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
            self.retriever.center.copy_(state["retriever.center"])
            self.retriever.scale.copy_(state["retriever.scale"])
            self.retriever.pick_bias.copy_(state["retriever.pick_bias"])

    @torch.no_grad()
    def fit_context_statistics(self, batches) -> None:
        """Set the retriever's feature statistics (mean and spread of the pooled context
        features) from batches of training contexts; a no-op for the paper's retriever."""
        if self.config.retriever == "paper":
            return
        feats = [context_features(self.embed(b.input_ids.to(self.device)), b.ctx_len.to(self.device), b.has_bos)
                 for b in batches]
        self.retriever.set_statistics(torch.cat(feats))

    def set_activation_checkpointing(self, on: bool = True) -> None:
        """Recompute the frozen layers' activations in the backward instead of keeping them (less
        memory, ~1/3 more compute). Built for the context-sharing layouts, where the K·B branches
        hold nearly all of a step's activations."""
        if on:
            raise SPTError(f"activation checkpointing is built for the shared layout, not {self.config.layout!r}")

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

    def scores(self, embeds: torch.Tensor, batch: Batch):
        feat = context_features(embeds, batch.ctx_len, batch.has_bos)
        keys = self.prompts.weight if self.config.key_grad else self.prompts.weight.detach()
        return self.retriever(feat, keys, tau=self.config.tau_sim)

    def pair_labels(self, persona_keys: list) -> torch.Tensor:
        """y_ij = +1 when sentence BLEU(persona_i, persona_j) > threshold, else −1 (cached per pair)."""
        return self.pairs.labels(persona_keys)

    def prompt_positions(self, ctx_len: torch.Tensor, tag_len: torch.Tensor | None = None) -> torch.Tensor:
        """Where each row's prompt goes inside its context (the layout's rule)."""
        return prompt_positions(self.config.layout, ctx_len, tag_len)

    def select_prompts(self, embeds: torch.Tensor, ctx_len: torch.Tensor, has_bos: bool, noise: float = 0.0,
                       generator=None) -> torch.Tensor:
        """The soft prompt per row (retriever top-1, optional selection noise): training-time
        validation and the generation engine both pick through this."""
        return select_prompts(self.retriever, self.prompts.weight, embeds, ctx_len, has_bos, self.config.tau_sim,
                              noise, generator)

    def response_hidden(self, batch: Batch, embeds: torch.Tensor, prompt_idx: torch.Tensor):
        """Hidden states that predict each response target, for every row: [N//B, B, R, d]."""
        B = batch.input_ids.shape[0]
        N = prompt_idx.shape[0]
        L = self.config.prompt_len
        row_src = torch.arange(N, device=embeds.device) % B
        pos = self.prompt_positions(batch.ctx_len, batch.tag_len)[row_src]
        rows = inject_prompts(embeds, self.prompts.weight.to(embeds.dtype), row_src, prompt_idx, pos)
        # Right padding + causal attention: real tokens never see padding, and position ids are
        # the same as unpadded, so no attention mask is needed (keeps SDPA on its causal path).
        # (transformers' forward keeps PyTorch's products here: on cpu_native's (cpu_linear, as the
        # shared layout runs them) a prefix step was 1.075x faster but its peak memory 5.5 -> 6.2-6.8
        # GiB, AMD EPYC)
        hidden = self.base.base_model(inputs_embeds=rows, use_cache=False).last_hidden_state
        # In every layout the response starts at L + ctx_len; target t is predicted one step earlier.
        R = batch.targets.shape[1]
        t = torch.arange(R, device=embeds.device)
        where = (L + batch.ctx_len[:, None] - 1 + t[None, :]).clamp_max(hidden.shape[1] - 1)  # [B, R]
        hidden = hidden.view(N // B, B, hidden.shape[1], hidden.shape[2])
        index = where[None, :, :, None].expand(N // B, B, R, hidden.shape[-1])
        return torch.gather(hidden, 2, index)

    # ---- training forward -----------------------------------------------------------------------
    def forward(self, batch: Batch, shard=None) -> dict:
        """The four losses of a batch ("loss" to backpropagate, and each part).

        shard (training.distributed.Shard): this batch is one process's part of a global batch.
        The parts are then this process's shares of the global losses (global token and sample
        counts; the contrastive loss over every pair of the global batch, the scores gathered with
        gradient), and "loss" is weighted so that DistributedDataParallel's gradient average is the
        gradient of the global loss."""
        cfg = self.config
        K, B = cfg.num_prompts, batch.input_ids.shape[0]
        embeds = self.embed(batch.input_ids)
        scores = pick = None
        if cfg.uses_retriever:
            scores, _, top = self.scores(embeds, batch)
            pick = top[:, 0]
        prompt_idx = torch.arange(K * B, device=embeds.device) // B
        hidden = self.response_hidden(batch, embeds, prompt_idx)
        head = self.base.get_output_embeddings()
        seq_ce_sum, fusion = fused_linear_ce(
            hidden, head.weight, head.bias, batch.targets, scores if cfg.use_fus else None
        )
        n_tokens = batch.resp_len.to(seq_ce_sum.device).clamp_min(1)
        seq_ce_mean = seq_ce_sum / n_tokens[None, :]
        share = 1.0 if shard is None else B / shard.total_samples
        parts = {"lm": losses.lm_loss(seq_ce_sum, batch.resp_len.to(seq_ce_sum.device),
                                      None if shard is None else shard.total_tokens,
                                      losses.routed_weights(scores, cfg.route, pick)),
                 "fus": None if fusion is None else fusion * share}
        parts["sel"] = (
            losses.selection_loss(seq_ce_mean, scores, cfg.tau_gold, cfg.tau_sim,
                                  cfg.target_noise if self.training else 0.0) * share
            if cfg.use_sel and scores is not None else None
        )
        if cfg.use_ctr and scores is not None:
            everyone = scores if shard is None else shard.gather(scores)
            keys = batch.persona_keys if shard is None else shard.persona_keys
            parts["ctr"] = losses.contrastive_loss(everyone, self.pair_labels(keys).to(scores.device))
        else:
            parts["ctr"] = None
        if shard is None:
            parts["loss"] = losses.combine(parts, cfg.lambda_sel, cfg.lambda_ctr)
        else:  # local shares x world (DDP averages), the global contrastive loss as it is
            local = losses.combine({**parts, "ctr": None}, cfg.lambda_sel, cfg.lambda_ctr)
            parts["loss"] = shard.world * local + (cfg.lambda_ctr * parts["ctr"] if parts["ctr"] is not None else 0)
        parts["seq_ce_mean"] = seq_ce_mean.detach()
        parts["scores"] = None if scores is None else scores.detach()
        parts["picks"] = pick
        return parts

    @torch.no_grad()
    def select(self, batch: Batch, noise: float = 0.0, generator=None) -> torch.Tensor:
        """Top-1 prompt per row of a batch (optional Gaussian selection noise for diversity)."""
        if self.config.num_prompts == 1:
            return torch.zeros(batch.input_ids.shape[0], dtype=torch.long, device=batch.input_ids.device)
        return self.select_prompts(self.embed(batch.input_ids), batch.ctx_len, batch.has_bos, noise, generator)

    @torch.no_grad()
    def eval_losses(self, batch: Batch) -> dict:
        """Validation sums: CE under the retriever's pick, under a random prompt (the mean over the
        K), under the best prompt (oracle), the LM loss, and what the retriever saw (its picks,
        how often the pick was the best prompt, the scores [B, K])."""
        out = self.forward(batch)
        ce = out["seq_ce_mean"]  # [K, B]
        pick = self.select(batch).to(ce.device)
        n = batch.resp_len.to(ce.device).float()
        picked = ce.gather(0, pick[None, :])[0]
        best = ce.min(0)
        return {
            "lm": float(out["lm"]),
            "selected_ce_sum": float((picked * n).sum()),
            "random_ce_sum": float((ce.mean(0) * n).sum()),
            "oracle_ce_sum": float((best.values * n).sum()),
            "n_tokens": float(n.sum()),
            "picks": pick.tolist(),
            "pick_is_best": (pick == best.indices).tolist(),
            "scores": None if out["scores"] is None else out["scores"].float().cpu(),
        }
