"""The SPT trainer: AdamW on the soft prompts and the retriever only, the base stays frozen."""
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..data.batch import collate
from ..data.corpora import Sample, load_samples, split_by_dialog
from ..data.text import Encoder
from ..errors import CheckpointError, SPTError
from ..model.build import build_spt_model
from ..model.layouts import get_layout
from ..model.loading import load
from ..model.spt import SPTConfig
from ..utils import DTYPE_NAMES, peak_memory_bytes, resolve_dtype
from . import checkpoint


@dataclass
class TrainConfig:
    model: str = "default"
    data: str = "chitchat"
    data_format: str | None = None
    valid_data: str | None = None
    output_dir: str = "runs/spt"
    max_steps: int = 100
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    # The retriever's W is a dense d×d map learning from a weak, noisy signal (which prompt fits a
    # context): it needs a rate of its own, 1e-3 (README, "Quality study"); None: the same as lr.
    retriever_lr: float | None = 1e-3
    weight_decay: float = 0.0
    dtype: str = "fp32"
    load_4bit: bool = False
    eval_every: int = 0  # 0: only at the end
    eval_samples: int = 64
    save_every: int = 0  # 0: only at the end
    seed: int = 0
    resume: bool = False
    valid_fraction: float = 0.05
    max_train_samples: int | None = None
    progress: bool = True

    def validate(self) -> "TrainConfig":
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise SPTError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPE_NAMES:
            raise SPTError(f"dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if self.lr <= 0:
            raise SPTError(f"lr must be > 0, got {self.lr}")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def load_splits(tc: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    train = load_samples(tc.data, tc.data_format)
    if tc.valid_data:
        valid = load_samples(tc.valid_data, tc.data_format)
    else:
        train, valid = split_by_dialog(train, tc.valid_fraction)
    if tc.max_train_samples:
        train = train[: tc.max_train_samples]
    return train, valid


def retrieval_stats(picks: list[int], pick_is_best: list[bool], scores: torch.Tensor | None, K: int) -> dict:
    """How the retriever chooses on held-out contexts.

    usage_entropy: entropy (nats) of its top-1 picks (0: one prompt for everything, ln K: uniform);
    pick_best_rate: how often the pick is the prompt with the lowest CE (chance: 1/K);
    score_std_contexts / score_std_prompts: the spread of the scores s[b, k] across contexts (for
    a fixed prompt) and across prompts (for a fixed context), each averaged: when the first is far
    below the second, every context ranks the prompts alike and the pick cannot depend on it.
    """
    usage = torch.bincount(torch.tensor(picks, dtype=torch.long), minlength=K).float() / max(len(picks), 1)
    used = usage[usage > 0]
    out = {"usage_entropy": max(0.0, float(-(used * used.log()).sum())), "usage": usage.tolist(),
           "pick_best_rate": sum(pick_is_best) / max(len(pick_is_best), 1)}
    if scores is not None and scores.shape[0] > 1 and K > 1:
        out["score_std_contexts"] = float(scores.std(0).mean())
        out["score_std_prompts"] = float(scores.std(1).mean())
    return out


class Trainer:
    def __init__(self, spt_cfg: SPTConfig, tc: TrainConfig, model=None, tokenizer=None, splits=None):
        self.spt_cfg = spt_cfg.validate()
        self.tc = tc.validate()
        self.out = Path(tc.output_dir)
        torch.manual_seed(tc.seed)
        self.train_samples, self.valid_samples = splits if splits is not None else load_splits(tc)
        if not self.train_samples:
            raise SPTError(f"{tc.data}: no training samples")
        if model is None:
            model, tokenizer = load(tc.model, resolve_dtype(tc.dtype), tc.load_4bit)
        self.tokenizer = tokenizer
        self.model = build_spt_model(model, spt_cfg, tokenizer)
        self.encoder = Encoder(tokenizer, spt_cfg.max_len, spt_cfg.prompt_len)
        # The retriever's W is a dense d×d map: Adam moves every entry by ~lr per step, which at the
        # prompts' learning rate can swing all cosines at once, so it may get its own rate.
        groups = [{"params": [self.model.prompts.weight], "lr": tc.lr},
                  {"params": list(self.model.retriever.parameters()), "lr": tc.retriever_lr or tc.lr}]
        self.optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
        self.step = 0
        self.cursor = 0  # position in the current epoch's order
        self.epoch = 0
        self.history: list[dict] = []
        self._valid_encoded = None
        if not (tc.resume and self._resume()):
            self.model.fit_context_statistics(self._statistics_batches())

    # ---- data order: a seeded permutation per epoch, resumable by (epoch, cursor) ----------
    def _order(self) -> list[int]:
        rng = random.Random(self.tc.seed * 1000003 + self.epoch)
        order = list(range(len(self.train_samples)))
        rng.shuffle(order)
        return order

    def _next_encoded(self, n: int) -> list:
        got = []
        order = self._order()
        while len(got) < n:
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order()
            enc = self.encoder.encode(self.train_samples[order[self.cursor]])
            self.cursor += 1
            if enc is not None:
                got.append(enc)
            elif self.encoder.n_skipped > 10 * (self.step + 1) * n + 100:
                raise SPTError(f"{self.tc.data}: almost no sample fits max_len={self.spt_cfg.max_len}")
        return got

    def _statistics_batches(self, n: int = 1024, size: int = 64):
        """Batches of up to n training contexts (a seeded sample) for the retriever's statistics."""
        rng = random.Random(self.tc.seed)
        picked = rng.sample(self.train_samples, min(n, len(self.train_samples)))
        enc = Encoder(self.tokenizer, self.spt_cfg.max_len, self.spt_cfg.prompt_len)  # own skip count
        encoded = [e for e in (enc.encode(s) for s in picked) if e is not None]
        pad, bos = self.tokenizer.pad_token_id, self.tokenizer.bos_token_id
        return [collate(encoded[i:i + size], pad, bos) for i in range(0, len(encoded), size)]

    def _valid(self) -> list:
        if self._valid_encoded is None:
            enc = [self.encoder.encode(s) for s in self.valid_samples[: self.tc.eval_samples]]
            self._valid_encoded = [e for e in enc if e is not None]
        return self._valid_encoded

    # ---- checkpoints --------------------------------------------------------------------------
    def config_dict(self) -> dict:
        base = self.model.base
        return {
            "spt": self.model.config.to_dict(),  # the layout as resolved, not 'auto'
            "train": asdict(self.tc),
            "model": getattr(base.config, "spt_model_path", self.tc.model),
            "model_type": getattr(base.config, "model_type", None),
            # Which sequence the layout name meant when this was trained (layouts can be redefined).
            "placement": get_layout(self.model.config.layout).description.split(":")[0],
            "hidden_size": int(self.model.prompts.weight.shape[-1]),
            "step": self.step,
        }

    def save(self) -> Path:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "history": self.history,
            "torch_rng": torch.get_rng_state(),
        }
        return checkpoint.save(self.out, self.step, self.model.trainable_state_dict(), self.config_dict(), state)

    def _resume(self) -> bool:
        """Load the latest checkpoint of the output folder; False when there is none."""
        try:
            tensors, config, folder = checkpoint.load(self.out)
        except CheckpointError:
            if not (self.out / checkpoint.LATEST).exists():
                print(f"--resume: no checkpoint in {self.out}, starting fresh", flush=True)
                return False
            raise
        if config.get("spt", {}).get("num_prompts") != self.spt_cfg.num_prompts:
            raise CheckpointError(f"{folder}: trained with K={config['spt'].get('num_prompts')}, "
                                  f"asked to resume with K={self.spt_cfg.num_prompts}")
        self.model.load_trainable_state_dict(tensors, str(folder))
        state = checkpoint.load_trainer_state(folder)
        if state is None:
            raise CheckpointError(f"{folder}: no trainer_state.pt, cannot resume")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.cursor = state["step"], state["epoch"], state["cursor"]
        self.history = state["history"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed from {folder} at step {self.step}", flush=True)
        return True

    # ---- loop -----------------------------------------------------------------------------------
    def validate(self) -> dict:
        """Held-out losses and what the retriever does (see retrieval_stats)."""
        self.model.eval()
        enc = self._valid()
        if not enc:
            return {}
        sums = {"selected_ce_sum": 0.0, "random_ce_sum": 0.0, "oracle_ce_sum": 0.0, "n_tokens": 0.0, "lm": 0.0}
        picks, best, scores = [], [], []
        bs = max(self.tc.batch_size, 4)
        for i in range(0, len(enc), bs):
            batch = collate(enc[i : i + bs], self.tokenizer.pad_token_id, self.tokenizer.bos_token_id)
            r = self.model.eval_losses(batch.to(self.model.device))
            for k in sums:
                sums[k] += r[k] * (r["n_tokens"] if k == "lm" else 1.0)
            picks += r["picks"]
            best += r["pick_is_best"]
            if r["scores"] is not None:
                scores.append(r["scores"])
        self.model.train()
        n = sums["n_tokens"]
        return {"val_loss": sums["selected_ce_sum"] / n, "val_random_loss": sums["random_ce_sum"] / n,
                "val_oracle_loss": sums["oracle_ce_sum"] / n, "val_lm_loss": sums["lm"] / n,
                **retrieval_stats(picks, best, torch.cat(scores) if scores else None, self.spt_cfg.num_prompts)}

    def fit(self) -> dict:
        from tqdm.auto import tqdm

        tc = self.tc
        self.model.train()
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", disable=not tc.progress,
                   dynamic_ncols=True)
        tokens = samples = 0
        t0 = time.perf_counter()
        log_path = self.out / "train_log.jsonl"
        self.out.mkdir(parents=True, exist_ok=True)
        while self.step < tc.max_steps:
            self.optimizer.zero_grad(set_to_none=True)
            parts_sum: dict = {}
            for _ in range(tc.grad_accum):
                batch = collate(self._next_encoded(tc.batch_size), self.tokenizer.pad_token_id,
                                self.tokenizer.bos_token_id).to(self.model.device)
                parts = self.model(batch)
                (parts["loss"] / tc.grad_accum).backward()
                for k in ("loss", "lm", "sel", "fus", "ctr"):
                    if parts.get(k) is not None:
                        parts_sum[k] = parts_sum.get(k, 0.0) + parts[k].detach().item() / tc.grad_accum
                tokens += int((batch.ctx_len + batch.resp_len).sum())
                samples += batch.input_ids.shape[0]
            if not math.isfinite(parts_sum["loss"]):
                raise SPTError(f"loss became {parts_sum['loss']} at step {self.step + 1}; try a lower --lr")
            self.optimizer.step()
            self.step += 1
            dt = time.perf_counter() - t0
            record = {"step": self.step, **parts_sum, "tokens_per_s": tokens / dt, "samples_per_s": samples / dt,
                      "peak_mem_bytes": peak_memory_bytes()}
            if (tc.eval_every and self.step % tc.eval_every == 0) or self.step == tc.max_steps:
                record.update(self.validate())
            self.history.append(record)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{parts_sum['loss']:.3f}", lm=f"{parts_sum['lm']:.3f}",
                            tok_s=f"{tokens / dt:.0f}")
            bar.update(1)
            if tc.save_every and self.step % tc.save_every == 0 and self.step < tc.max_steps:
                self.save()
        bar.close()
        last = self.history[-1] if self.history else {}
        final = {k: v for k, v in last.items() if k.startswith(("val_", "usage", "pick_", "score_"))}
        if "val_loss" not in final:
            final = self.validate()
        folder = self.save()
        dt = time.perf_counter() - t0
        summary = {"steps": self.step, "checkpoint": str(folder), "seconds": dt,
                   "samples_per_s": samples / dt if dt else 0.0, "tokens_per_s": tokens / dt if dt else 0.0,
                   "peak_mem_bytes": peak_memory_bytes(), "skipped_too_long": self.encoder.n_skipped, **final}
        print(f"trained {self.step} steps in {dt:.1f}s ({summary['samples_per_s']:.2f} samples/s, "
              f"{summary['tokens_per_s']:.0f} tokens/s, peak mem {summary['peak_mem_bytes'] / 2**30:.2f} GiB); "
              f"val loss {final.get('val_loss', float('nan')):.4f}; saved {folder}", flush=True)
        return summary
