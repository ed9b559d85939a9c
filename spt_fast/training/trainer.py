"""The SPT trainer: AdamW on the soft prompts and the retriever only, the base stays frozen."""
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from ..data.batch import collate
from ..data.corpora import Sample, load_samples, split_by_dialog
from ..data.text import Encoder
from ..errors import SPTError
from ..model.build import build_spt_model
from ..model.layouts import get_layout
from ..model.loading import load
from ..model.spt import SPTConfig
from ..utils import DTYPE_NAMES, bound_heap_retention, check_number, peak_memory_bytes, resolve_dtype
from . import checkpoint
from .distributed import Distributed, data_parallel
from .resume import (compare_settings, load_optimizer_state, load_rng_state, optimizer_state, read_log, rewrite_log,
                     rng_state, run_settings)


@dataclass
class TrainConfig:
    model: str = "default"
    data: str = "chitchat"
    data_format: str | None = None
    valid_data: str | None = None
    output_dir: str = "runs/spt"
    max_steps: int = 100
    epochs: float | None = None  # when set, max_steps is this many passes over the training samples
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    # The retriever's W is a dense d×d map learning from a weak, noisy signal (which prompt fits a
    # context): it needs a rate of its own, 1e-3 (README, "Quality study"); None: the same as lr.
    retriever_lr: float | None = 1e-3
    weight_decay: float = 0.0
    dtype: str = "fp32"
    load_4bit: bool = False
    activation_checkpointing: bool = False  # shared layout: recompute the branch layers in the backward
    eval_every: int = 0  # 0: only at the end
    eval_samples: int = 64
    save_every: int = 0  # checkpoint every N steps (0: off) ...
    save_minutes: float = 5.0  # ... and at least every this many minutes (0: off); always at the end
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # replace a run already in output_dir (without resume)
    allow_changes: bool = False  # on resume, apply changed max_steps / learning rates / weight decay / model
    valid_fraction: float = 0.05
    max_train_samples: int | None = None
    strict_data: bool = False  # samples with nothing to learn (empty response) are errors, not skipped
    dist_timeout: float = 600.0  # seconds a process waits for the others (torchrun) before giving up
    progress: bool = True

    def validate(self) -> "TrainConfig":
        for name in ("max_steps", "batch_size", "grad_accum"):
            check_number(f"--{name.replace('_', '-')}", getattr(self, name), 1, strict=False, integer=True)
        for name in ("eval_every", "save_every"):
            check_number(f"--{name.replace('_', '-')}", getattr(self, name), 0, strict=False, integer=True)
        check_number("--eval-samples", self.eval_samples, 1, strict=False, integer=True)
        if self.epochs is not None:
            check_number("--epochs", self.epochs)
        if self.dtype not in DTYPE_NAMES:
            raise SPTError(f"--dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        check_number("--lr", self.lr)
        if self.retriever_lr is not None:
            check_number("--retriever-lr", self.retriever_lr)
        check_number("--weight-decay", self.weight_decay, strict=False)
        check_number("--save-minutes", self.save_minutes, strict=False)
        if self.max_train_samples is not None:
            check_number("--max-train-samples", self.max_train_samples, 1, strict=False, integer=True)
        if not 0.0 < self.valid_fraction < 1.0:
            raise SPTError(f"valid_fraction must be between 0 and 1 (exclusive), got {self.valid_fraction}")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class TrainingInterrupted(SPTError):
    """SIGINT/SIGTERM during training: a checkpoint was saved first."""


def load_splits(tc: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    train = load_samples(tc.data, tc.data_format, strict=tc.strict_data)
    if tc.valid_data:
        valid = load_samples(tc.valid_data, tc.data_format, strict=tc.strict_data)
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
    """Trains the prompts and the retriever of `spt_cfg` with `tc`; `fit()` runs the loop.

    Never loses work: a checkpoint every `save_every` steps and every `save_minutes`, one on
    SIGINT/SIGTERM (a second Ctrl-C stops at once), one at the end. A resume continues from the
    newest intact checkpoint and refuses changed settings (resume.compare_settings)."""

    def __init__(self, spt_cfg: SPTConfig, tc: TrainConfig, model=None, tokenizer=None, splits=None):
        self.spt_cfg = spt_cfg.validate()
        self.tc = tc.validate()
        self.out = Path(tc.output_dir)
        self.dist = Distributed(tc.dist_timeout)  # torchrun's processes, or a world of one
        self._prepare_output()  # before any expensive work: an unusable folder fails now
        torch.manual_seed(tc.seed)
        self.train_samples, self.valid_samples = splits if splits is not None else load_splits(tc)
        if not self.train_samples:
            raise SPTError(f"{tc.data}: no training samples")
        if tc.epochs is not None:
            per_step = tc.batch_size * tc.grad_accum * self.dist.world
            self.tc = tc = replace(tc, max_steps=max(1, math.ceil(tc.epochs * len(self.train_samples) / per_step)))
        if model is None:
            if tc.load_4bit and self.dist.device.type == "cpu":
                bound_heap_retention()  # memory is the point of a 4-bit run (utils)
            model, tokenizer = load(tc.model, resolve_dtype(tc.dtype), tc.load_4bit)
            model = model.to(self.dist.device)  # each process's own copy on its own device
        self.tokenizer = tokenizer
        self.model = build_spt_model(model, spt_cfg, tokenizer)
        if tc.activation_checkpointing:
            self.model.set_activation_checkpointing(True)
        self.encoder = Encoder(tokenizer, spt_cfg.max_len, spt_cfg.prompt_len)
        groups = [{"params": [self.model.prompts.weight], "lr": tc.lr},
                  {"params": list(self.model.retriever.parameters()), "lr": tc.retriever_lr or tc.lr}]
        self.optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
        self.step = 0
        self.cursor = 0  # position in the current epoch's order
        self.epoch = 0
        self.history: list[dict] = []
        self.changed: dict = {}  # settings a resume changed (with allow_changes), {name: (old, new)}
        self._valid_encoded = None
        self._stop = None  # the signal that asked the loop to stop
        if not (tc.resume and self._resume()):
            self.model.fit_context_statistics(self._statistics_batches())
        self.forward = data_parallel(self.model, self.dist)

    # ---- the output folder ------------------------------------------------------------------
    def _prepare_output(self) -> None:
        tc = self.tc
        if tc.resume or tc.overwrite or not checkpoint.holds_run(self.out):
            pass
        else:
            raise SPTError(f"--output-dir {self.out} already holds a training run: add --resume to continue it, "
                           "--overwrite to replace it, or choose another folder")
        if not self.dist.main:  # process 0 alone writes; the others wait until it has
            self.dist.barrier()
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{os.getpid()}.tmp"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise SPTError(f"--output-dir {self.out}: cannot write there ({exc.strerror or exc})") from None
        if tc.overwrite and not tc.resume and checkpoint.holds_run(self.out):
            checkpoint.remove_run(self.out)
            print(f"--overwrite: removed the previous run in {self.out}", flush=True)
        checkpoint.clean_stale(self.out)
        self.dist.barrier()

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
        enc = Encoder(self.tokenizer, self.spt_cfg.max_len, self.spt_cfg.prompt_len)  # own counts
        encoded = [e for e in (enc.encode(s) for s in picked) if e is not None]
        pad, bos = self.tokenizer.pad_token_id, self.tokenizer.bos_token_id
        return [collate(encoded[i:i + size], pad, bos) for i in range(0, len(encoded), size)]

    def _valid(self) -> list:
        if self._valid_encoded is None:
            enc = Encoder(self.tokenizer, self.spt_cfg.max_len, self.spt_cfg.prompt_len)
            self._valid_encoded = [e for e in map(enc.encode, self.valid_samples[: self.tc.eval_samples]) if e]
        return self._valid_encoded

    # ---- checkpoints --------------------------------------------------------------------------
    def config_dict(self) -> dict:
        base = self.model.base
        return {
            "spt": self.model.config.to_dict(),  # the layout as resolved, not 'auto'
            "train": asdict(self.tc),
            # As the user named it ('default' or the folder given): portable across machines.
            "model": self.tc.model,
            "model_type": getattr(base.config, "model_type", None),
            # Which sequence the layout name meant when this was trained (layouts can be redefined).
            "placement": get_layout(self.model.config.layout).description.split(": ", 1)[0],
            "hidden_size": int(self.model.prompts.weight.shape[-1]),
            "step": self.step,
            "world_size": self.dist.world,  # processes; the global batch is train.batch_size x this
        }

    def save(self) -> Path:
        opt_tensors, opt_meta = optimizer_state(self.optimizer)
        meta = {"step": self.step, "epoch": self.epoch, "cursor": self.cursor, "optimizer": opt_meta}
        state = ({**opt_tensors, **rng_state()}, meta)
        folder = checkpoint.save(self.out, self.step, self.model.trainable_state_dict(), self.config_dict(), state)
        self._saved_at = time.perf_counter()
        return folder

    def _resume(self) -> bool:
        """Load the newest intact checkpoint of the output folder; False when there is none."""
        if not checkpoint.holds_checkpoint(self.out):
            print(f"--resume: no checkpoint in {self.out}, starting fresh", flush=True)
            if self.dist.main and (self.out / checkpoint.LOG).exists():
                rewrite_log(self.out / checkpoint.LOG, [])  # steps that were never saved
            return False
        tensors, config, folder = checkpoint.load(self.out, need_state=True)
        recorded = run_settings(SPTConfig.from_dict(config.get("spt", {})), TrainConfig.from_dict(config.get("train", {})),
                                config.get("world_size", 1))
        self.changed = compare_settings(recorded, run_settings(self.model.config, self.tc, self.dist.world),
                                        self.tc.allow_changes, str(folder))
        self.model.load_trainable_state_dict(tensors, str(folder))
        state_tensors, meta = checkpoint.load_trainer_state(folder)
        load_optimizer_state(self.optimizer, state_tensors, meta["optimizer"])
        # The rates and decay now asked for (unchanged ones are the same as recorded).
        for group, lr in zip(self.optimizer.param_groups, (self.tc.lr, self.tc.retriever_lr or self.tc.lr)):
            group["lr"], group["weight_decay"] = lr, self.tc.weight_decay
        self.step, self.epoch, self.cursor = meta["step"], meta["epoch"], meta["cursor"]
        load_rng_state(state_tensors)
        log = self.out / checkpoint.LOG
        self.history = read_log(log, self.step)
        if self.dist.main:
            rewrite_log(log, self.history)  # steps after the checkpoint will be logged again, once
            print(f"resumed from {folder} at step {self.step}", flush=True)
            for name, (old, new) in self.changed.items():
                print(f"--allow-changes: {name} {old!r} -> {new!r}", flush=True)
        self.dist.barrier()  # nobody writes the log before process 0 has rewritten it
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

    def _one_step(self) -> dict:
        """One optimizer step over a global batch (grad_accum micro-batches of batch_size x world
        samples; this process takes its part of each)."""
        tc, dist = self.tc, self.dist
        self.optimizer.zero_grad(set_to_none=True)
        parts_sum: dict = {}
        tokens = samples = 0
        K = self.spt_cfg.num_prompts
        counts = torch.zeros(K, device=self.model.device)  # the retriever's training picks, for its pick bias
        pad, bos = self.tokenizer.pad_token_id, self.tokenizer.bos_token_id
        for _ in range(tc.grad_accum):
            everyone = self._next_encoded(tc.batch_size * dist.world)
            batch = collate(dist.part(everyone), pad, bos).to(self.model.device)
            shard = None
            if dist.active:
                total = torch.tensor(float(sum(len(e.response_ids) for e in everyone)), device=self.model.device)
                shard = dist.shard(total, len(everyone), [e.persona_key for e in everyone])
            parts = self.forward(batch, shard)
            (parts["loss"] / tc.grad_accum).backward()
            for k in ("lm", "sel", "fus", "ctr"):
                if parts.get(k) is not None:
                    parts_sum[k] = parts_sum.get(k, 0.0) + parts[k].detach().float() / tc.grad_accum
            if parts.get("picks") is not None:
                counts = counts + torch.bincount(parts["picks"], minlength=K).float()
            tokens += sum(len(e.context_ids) + len(e.response_ids) for e in everyone)
            samples += len(everyone)
        if dist.active:  # each process holds its share of lm/sel/fus: the global values are their sums
            for k in ("lm", "sel", "fus"):
                if k in parts_sum:
                    parts_sum[k] = dist.sum(parts_sum[k])
        parts_sum = {k: float(v) for k, v in parts_sum.items()}
        cfg = self.model.config
        parts_sum["loss"] = (parts_sum["lm"] + cfg.lambda_sel * parts_sum.get("sel", 0.0) + parts_sum.get("fus", 0.0)
                             + cfg.lambda_ctr * parts_sum.get("ctr", 0.0))
        if not math.isfinite(parts_sum["loss"]):
            raise SPTError(f"loss became {parts_sum['loss']} at step {self.step + 1}; try a lower --lr")
        self.optimizer.step()
        if self.spt_cfg.balance_rate > 0 and K > 1:
            # Every process applies the same update from the global counts, so the biases stay equal.
            self.model.retriever.update_pick_bias(dist.sum(counts) if dist.active else counts,
                                                  self.spt_cfg.balance_rate)
        self.step += 1
        return {"parts": parts_sum, "tokens": tokens, "samples": samples}

    def _due_for_save(self) -> bool:
        tc = self.tc
        if self.step >= tc.max_steps:
            return False  # the final save follows
        by_steps = tc.save_every and self.step % tc.save_every == 0
        by_time = tc.save_minutes and time.perf_counter() - self._saved_at >= 60 * tc.save_minutes
        return bool(by_steps or by_time)

    def _log(self, record: dict) -> None:
        path = self.out / checkpoint.LOG
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise SPTError(f"{path}: cannot write the training log ({exc.strerror or exc})") from None

    def fit(self) -> dict:
        """Train up to max_steps; TrainingInterrupted (after saving) on SIGINT/SIGTERM. Under
        torchrun every process trains its part; process 0 alone logs, validates and saves."""
        from tqdm.auto import tqdm

        tc, main = self.tc, self.dist.main
        self.model.train()
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", disable=not (tc.progress and main),
                   dynamic_ncols=True)
        tokens = samples = 0
        t0 = self._saved_at = time.perf_counter()
        with self._stop_on_signals():
            while self.step < tc.max_steps:
                if self.dist.any(self._stop is not None):  # every process stops at the same step
                    self._stop = self._stop or "a stop on another process"
                    break
                try:
                    done = self._one_step()
                except RuntimeError as exc:  # a collective in the step (DDP's, the gathers) lost a peer
                    if self.dist.active:
                        raise self.dist.failure(exc) from None
                    raise
                tokens, samples = tokens + done["tokens"], samples + done["samples"]
                dt = time.perf_counter() - t0
                record = {"step": self.step, **done["parts"], "tokens_per_s": tokens / dt,
                          "samples_per_s": samples / dt, "peak_mem_bytes": peak_memory_bytes()}
                if main and ((tc.eval_every and self.step % tc.eval_every == 0) or self.step == tc.max_steps):
                    record.update(self.validate())
                self.history.append(record)
                if main:
                    self._log(record)
                bar.set_postfix(loss=f"{done['parts']['loss']:.3f}", lm=f"{done['parts']['lm']:.3f}",
                                tok_s=f"{tokens / dt:.0f}")
                bar.update(1)
                if main and self._due_for_save():
                    self.save()
            bar.close()
            if self._stop is not None:
                folder = self.save() if main else self.out
                self.dist.barrier()
                raise TrainingInterrupted(f"{self._stop} at step {self.step}: saved {folder}; continue with "
                                          f"--resume --output-dir {self.out}")
        final, folder = {}, None
        if main:
            last = self.history[-1] if self.history else {}
            final = {k: v for k, v in last.items() if k.startswith(("val_", "usage", "pick_", "score_"))}
            if "val_loss" not in final:
                final = self.validate()
            folder = self.save()
        self.dist.barrier()
        dt = time.perf_counter() - t0
        summary = {"steps": self.step, "checkpoint": str(folder), "seconds": dt,
                   "samples_per_s": samples / dt if dt else 0.0, "tokens_per_s": tokens / dt if dt else 0.0,
                   "peak_mem_bytes": peak_memory_bytes(), "skipped_too_long": self.encoder.n_skipped,
                   "truncated_utterances": self.encoder.n_cut, "world_size": self.dist.world, **final}
        if main and (self.encoder.n_skipped or self.encoder.n_cut):
            print(f"note: {self.encoder.n_skipped} training samples did not fit max_len={self.spt_cfg.max_len} "
                  f"and were skipped; {self.encoder.n_cut} over-long utterances were cut to their end", flush=True)
        if main:
            print(f"trained {self.step} steps in {dt:.1f}s ({summary['samples_per_s']:.2f} samples/s, "
                  f"{summary['tokens_per_s']:.0f} tokens/s, peak mem {summary['peak_mem_bytes'] / 2**30:.2f} GiB); "
                  f"val loss {final.get('val_loss', float('nan')):.4f}; saved {folder}", flush=True)
        return summary

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT/SIGTERM ask the loop to stop after the current step and save; a second SIGINT
        stops at once. Only in the main thread (signal handlers cannot be set elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def ask(signum, frame):
            self._stop = signal.Signals(signum).name
            print(f"\n{self._stop}: saving a checkpoint after this step (Ctrl-C again to stop now)",
                  file=sys.stderr, flush=True)
            signal.signal(signal.SIGINT, signal.default_int_handler)

        for sig in previous:
            signal.signal(sig, ask)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
