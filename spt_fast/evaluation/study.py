"""The quality study: PT vs SPT, prefix vs shared layout, and each extra loss removed in turn.

Every run gets the same budget (steps × batch, same seeded data order per seed), the same held-out
split and the same metrics. Each finished run leaves `runs/<name>-seed<S>/result.json`; a rerun of
the study skips those and resumes unfinished ones from their last checkpoint, so an interrupted
study costs only the steps since that checkpoint. With `jobs` > 1 the runs are shared by that many
worker processes, each with its share of the threads (a run is claimed by a lock on its folder).

Outputs in the study folder: results.json (one row per run and seed), summary.json (mean and spread
per run), results.md (the table), loss_curves.png, metrics.png, usage_<run>.png.
"""
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import SPTError
from ..model.spt import SPTConfig
from ..training.trainer import TrainConfig, Trainer, load_splits
from ..utils import write_text_atomic
from .evaluate import evaluate, write_predictions

ALL_LOSSES = ("sel", "fus", "ctr")
GENERATION_METRICS = ("f1", "bleu", "rouge1", "rouge2", "rougeL", "dist1", "dist2", "empty")
METRICS = (*GENERATION_METRICS, "val_loss", "val_random_loss", "val_oracle_loss", "usage_entropy", "pick_best_rate",
           "first_token_ce", "later_token_ce")


@dataclass(frozen=True)
class RunSpec:
    layout: str
    K: int
    losses: tuple  # extra losses on; the LM loss always is
    every_seed: bool = True  # False: only the study's first seed (a comparison made once)


def run_specs(num_prompts: int) -> dict[str, RunSpec]:
    specs = {
        "pt-prefix": RunSpec("prefix", 1, ()),
        "pt-shared": RunSpec("shared", 1, ()),
        "spt-prefix": RunSpec("prefix", num_prompts, ALL_LOSSES),
        "spt-shared": RunSpec("shared", num_prompts, ALL_LOSSES),
        "spt-shared-old": RunSpec("shared-old", num_prompts, ALL_LOSSES, every_seed=False),
    }
    for drop in ALL_LOSSES:
        specs[f"spt-shared-no-{drop}"] = RunSpec("shared", num_prompts, tuple(x for x in ALL_LOSSES if x != drop))
    return specs


@dataclass
class StudyConfig:
    output_dir: str = "runs/study"
    model: str = "default"
    data: str = "chitchat"
    data_format: str | None = None
    steps: int = 200
    batch_size: int = 2
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    num_prompts: int = 4
    prompt_len: int = 8
    max_len: int = 128
    lr: float = 3e-3
    retriever_lr: float = 1e-3
    retriever: str = "centered"
    tau_gold: float = SPTConfig.tau_gold
    route: float = SPTConfig.route
    key_grad: bool = SPTConfig.key_grad
    balance_rate: float = SPTConfig.balance_rate
    lambda_sel: float = SPTConfig.lambda_sel
    lambda_ctr: float = SPTConfig.lambda_ctr
    eval_samples: int = 64  # held-out samples for generation metrics
    val_samples: int = 200  # held-out samples for the validation losses and the retriever's picks
    max_new_tokens: int = 32
    runs: list | None = None  # None: all of run_specs()
    progress: bool = True
    jobs: int = 1  # worker processes training runs at once (not a setting: results do not depend on it)

    def settings(self) -> dict:
        """What a finished run must share with this study to be reused."""
        keep = ("model", "data", "data_format", "steps", "batch_size", "num_prompts", "prompt_len", "max_len",
                "lr", "retriever_lr", "retriever", "tau_gold", "eval_samples", "val_samples", "max_new_tokens")
        out = {k: getattr(self, k) for k in keep}
        # Fields added later count only where they differ from what runs made before them used.
        for name, before in (("route", 0.0), ("lambda_sel", 0.4), ("lambda_ctr", 0.4), ("key_grad", True),
                             ("balance_rate", 0.0)):
            if getattr(self, name) != before:
                out[name] = getattr(self, name)
        return out

    def run_settings(self, K: int) -> dict:
        """settings() as they bear on a run with K prompts: a one-prompt run (PT) has no
        retriever, so the retriever's settings cannot change it and a study that changes only
        them reuses its PT runs."""
        return settings_for(self.settings(), K)


# What only the retriever reads (its losses, its learning rate, how it picks).
RETRIEVER_SETTINGS = ("retriever_lr", "retriever", "tau_gold", "route", "key_grad", "balance_rate",
                      "lambda_sel", "lambda_ctr")


def settings_for(settings: dict, K: int) -> dict:
    return settings if K > 1 else {k: v for k, v in settings.items() if k not in RETRIEVER_SETTINGS}


def usage_entropy(picks: list[int], num_prompts: int) -> float:
    """Entropy (nats) of the retriever's top-1 choices; 0 for K=1, ln K when usage is uniform."""
    if not picks:
        return 0.0
    counts = [picks.count(k) for k in range(num_prompts)]
    n = len(picks)
    # max(): a single used prompt gives -0.0, which would print as "-0.000".
    return max(0.0, float(-sum(c / n * math.log(c / n) for c in counts if c)))


@torch.no_grad()
def first_token_stats(spt, tok, samples, batch_size: int = 8) -> dict:
    """Teacher-forced CE of the first response token and of the later ones, under the retriever's
    pick, and the tokens the model most often puts first: where a layout hurts the reply's start
    (a stop string right away) this separates it from how well the rest of the reply is modelled."""
    from collections import Counter

    import torch.nn.functional as F

    from ..data.batch import collate
    from ..data.text import Encoder

    enc = Encoder(tok, spt.config.max_len, spt.config.prompt_len)
    encoded = [e for e in (enc.encode(s) for s in samples) if e is not None]
    first = later = 0.0
    n_later = 0
    tops: Counter = Counter()
    head = spt.base.get_output_embeddings()
    for i in range(0, len(encoded), batch_size):
        b = collate(encoded[i:i + batch_size], tok.pad_token_id, tok.bos_token_id).to(spt.device)
        hidden = spt.response_hidden(b, spt.embed(b.input_ids), spt.select(b))[0]  # [B, R, d]
        logits = head(hidden).float()
        ce = F.cross_entropy(logits.transpose(1, 2), b.targets, ignore_index=-100, reduction="none")
        first += float(ce[:, 0].sum())
        later += float(ce[:, 1:].sum())
        n_later += int((b.targets[:, 1:] != -100).sum())
        tops.update(tok.decode([t]) for t in logits[:, 0].argmax(-1).tolist())
    return {"first_token_ce": first / max(len(encoded), 1), "later_token_ce": later / max(n_later, 1),
            "first_token_top": tops.most_common(4)}


def run_folder(sc: StudyConfig, name: str, seed: int) -> Path:
    return Path(sc.output_dir) / "runs" / f"{name}-seed{seed}"


def claim(folder: Path):
    """An exclusive lock on a run's folder for this process (an open file to close when done), or
    None when another process holds it. The OS drops the lock when its process ends, however it
    ends, so a killed worker leaves no stale claim behind."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".claim", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def run_claimed(sc: StudyConfig, name: str, spec: RunSpec, seed: int, loaded, skip_claimed: bool = False):
    """_one_run under the run's claim; a run another process is training is skipped (a worker) or
    refused (the main pass: two studies in one folder would write the same checkpoints)."""
    folder = run_folder(sc, name, seed)
    if (folder / "result.json").exists():  # a worker leaves finished runs to the main pass
        return None if skip_claimed else _one_run(sc, name, spec, seed, *loaded)
    lock = claim(folder)
    if lock is None:
        if skip_claimed:
            return None
        raise SPTError(f"{folder}: another study process is training this run now")
    with lock:
        if skip_claimed and (folder / "result.json").exists():  # another worker finished it just now
            return None
        return _one_run(sc, name, spec, seed, *loaded)


def _one_run(sc: StudyConfig, name: str, spec: RunSpec, seed: int, base, tok, splits, held_out) -> dict:
    layout, K, losses = spec.layout, spec.K, spec.losses
    folder = run_folder(sc, name, seed)
    done = folder / "result.json"
    if done.exists():
        row = json.loads(done.read_text())
        if settings_for(row.get("settings") or {}, K) != sc.run_settings(K):
            raise SPTError(f"{done}: this run was made with other settings ({row.get('settings')}); "
                           "use a new --output-dir or delete that folder")
        print(f"== {name} seed {seed}: done earlier, reusing {done}", flush=True)
        row["usage_entropy"] = usage_entropy(row["picks"], K)  # recomputed from the stored choices
        if "first_token_ce" not in row:  # made before the study measured it: score the checkpoint now
            from ..training.checkpoint import load_for_inference

            spt, _, _ = load_for_inference(str(folder), model=sc.model)
            row.update(first_token_stats(spt, tok, held_out[: sc.val_samples]))
            write_text_atomic(done, json.dumps(row))
        return row
    cfg = SPTConfig(num_prompts=K, prompt_len=sc.prompt_len, layout=layout, max_len=sc.max_len, seed=seed,
                    use_sel="sel" in losses, use_fus="fus" in losses, use_ctr="ctr" in losses,
                    retriever=sc.retriever, tau_gold=sc.tau_gold, route=sc.route, key_grad=sc.key_grad,
                    balance_rate=sc.balance_rate, lambda_sel=sc.lambda_sel, lambda_ctr=sc.lambda_ctr)
    tc = TrainConfig(model=sc.model, data=sc.data, data_format=sc.data_format, output_dir=str(folder),
                     max_steps=sc.steps, batch_size=sc.batch_size, lr=sc.lr, retriever_lr=sc.retriever_lr,
                     seed=seed, eval_samples=sc.val_samples, eval_every=0,
                     save_every=max(1, sc.steps // 3), resume=True, progress=sc.progress)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, tc, model=base, tokenizer=tok, splits=splits)
    print(f"== {name} seed {seed}: layout {layout}, K={K}, losses lm+{'+'.join(losses) or 'none'}, "
          f"{sc.steps} steps x batch {sc.batch_size}", flush=True)
    summary = trainer.fit()
    from ..generation.engine import Engine

    result = evaluate(Engine(trainer.model, tok), held_out, max_new_tokens=sc.max_new_tokens, progress=sc.progress)
    write_predictions(folder / "predictions.jsonl", result)
    first = first_token_stats(trainer.model, tok, held_out[: sc.val_samples])
    row = {"run": name, "layout": layout, "K": K, "losses": ["lm", *losses], "seed": seed, "steps": summary["steps"],
           **{k: result["metrics"][k] for k in GENERATION_METRICS},
           **{k: summary.get(k) for k in ("val_loss", "val_random_loss", "val_oracle_loss", "pick_best_rate",
                                           "score_std_contexts", "score_std_prompts")},
           "usage_entropy": usage_entropy(result["picks"], K),
           "n_eval": result["metrics"].get("n"), "train_seconds": summary["seconds"],
           "seconds": time.perf_counter() - t0, "settings": sc.settings(),
           **first, "picks": result["picks"], "turns": result["turns"],
           "curve": [{k: r[k] for k in ("step", "loss", "lm", "val_loss") if k in r} for r in trainer.history]}
    write_text_atomic(done, json.dumps(row))
    return row


def aggregate(rows: list[dict]) -> dict:
    """run -> {metric: {mean, std, n}}; std is the sample spread over seeds (0 with one seed)."""
    out: dict = {}
    for row in rows:
        out.setdefault(row["run"], []).append(row)
    agg = {}
    for run, rs in out.items():
        agg[run] = {}
        for m in METRICS:
            vals = [r[m] for r in rs if r.get(m) is not None]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            agg[run][m] = {"mean": mean, "std": std, "n": len(vals)}
    return agg


def format_markdown(agg: dict) -> str:
    cols = [("F1", "f1"), ("BLEU", "bleu"), ("R-1", "rouge1"), ("R-2", "rouge2"), ("R-L", "rougeL"),
            ("D-1", "dist1"), ("D-2", "dist2"), ("empty %", "empty"), ("val loss (pick)", "val_loss"),
            ("random-prompt CE", "val_random_loss"), ("best-prompt CE", "val_oracle_loss"),
            ("usage H", "usage_entropy"), ("pick = best", "pick_best_rate"),
            ("1st-token CE", "first_token_ce"), ("later CE", "later_token_ce")]
    lines = ["| run | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for run, ms in agg.items():
        cells = []
        for _, key in cols:
            m = ms.get(key)
            digits = 3 if key.endswith(("loss", "entropy", "_ce", "_rate")) else 2
            cells.append("-" if m is None else f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(sc: StudyConfig, rows: list[dict]) -> dict:
    from .plots import plot_loss_curves, plot_metric_bars, plot_prompt_usage

    out = Path(sc.output_dir)
    public = [{k: v for k, v in r.items() if k not in ("picks", "turns", "curve", "settings")} for r in rows]
    write_text_atomic(out / "results.json", json.dumps(public, indent=1))
    agg = aggregate(rows)
    table = format_markdown(agg)
    seeds = sorted({r["seed"] for r in rows})
    write_text_atomic(out / "summary.json", json.dumps({"config": asdict(sc), "seeds": seeds, "runs": agg}, indent=1))
    firsts = ["", "Most frequent first reply tokens (argmax at the first response position, teacher-forced), "
              "per seed:", ""]
    for r in sorted(rows, key=lambda r: (list(agg).index(r["run"]), r["seed"])):
        top = ", ".join(f"{t!r} {c}" for t, c in r.get("first_token_top", []))
        firsts.append(f"- {r['run']} seed {r['seed']}: {top}")
    write_text_atomic(out / "results.md", table + "\n" + "\n".join(firsts) + "\n")
    # Training LM loss per run, averaged over seeds and smoothed: batches of 2 make single steps noisy.
    curves = {}
    for run in agg:
        per_seed = [[p["lm"] for p in r["curve"]] for r in rows if r["run"] == run]
        n = min(len(c) for c in per_seed)
        mean = [sum(c[i] for c in per_seed) / len(per_seed) for i in range(n)]
        w = max(1, n // 8)
        curves[run] = [(i + 1, sum(mean[max(0, i - w + 1): i + 1]) / len(mean[max(0, i - w + 1): i + 1]))
                       for i in range(n)]
    plot_loss_curves(curves, out / "loss_curves.png",
                     title=f"training LM loss (mean of {len(seeds)} seeds, moving average)")
    plot_metric_bars(agg, ("f1", "bleu", "rougeL", "dist1", "dist2", "val_loss"), out / "metrics.png",
                     title=f"mean ± spread over seeds {seeds}")
    for r in rows:
        if r["seed"] == seeds[0] and r["K"] > 1 and r["picks"]:
            plot_prompt_usage(r["turns"], r["picks"], r["K"], out / f"usage_{r['run']}.png",
                              title=f"{r['run']} (seed {r['seed']}): prompt usage per turn")
    return agg


def study_jobs(sc: StudyConfig) -> list[tuple[str, RunSpec, int]]:
    """(run name, spec, seed) for every run of the study, in the order a single process trains them."""
    specs = run_specs(sc.num_prompts)
    names = sc.runs or list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SPTError(f"study: unknown run(s) {unknown}; choose from {list(specs)}")
    return [(name, specs[name], seed) for i, seed in enumerate(sc.seeds) for name in names
            if specs[name].every_seed or i == 0]


def _load_inputs(sc: StudyConfig):
    from ..model.loading import load
    from ..utils import resolve_dtype

    tc = TrainConfig(model=sc.model, data=sc.data, data_format=sc.data_format)
    splits = load_splits(tc)
    held_out = splits[1][: sc.eval_samples]
    if not held_out:
        raise SPTError(f"{sc.data}: the held-out split is empty")
    base, tok = load(sc.model, resolve_dtype("fp32"))
    return base, tok, splits, held_out


def _worker(config: dict, threads: int) -> None:
    """One of `jobs` processes: train every unfinished run no other worker has claimed, the costliest
    first (K prompts, then the prefix layout) so that no long run is left for the end."""
    torch.set_num_threads(threads)
    sc = StudyConfig(**config)
    try:
        loaded = _load_inputs(sc)
        for name, spec, seed in sorted(study_jobs(sc), key=lambda j: (-j[1].K, j[1].layout != "prefix")):
            run_claimed(sc, name, spec, seed, loaded, skip_claimed=True)
    except SPTError as exc:  # the main pass meets the same run next and reports it there
        print(f"study worker: {exc}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass


def _run_workers(sc: StudyConfig) -> None:
    """Start sc.jobs worker processes (spawned: a fresh interpreter each, no forked torch threads)
    and wait for them. Whatever they leave unfinished (a worker that failed or was stopped) the main
    pass then resumes or reports."""
    import multiprocessing

    threads = max(1, torch.get_num_threads() // sc.jobs)
    config = {**asdict(sc), "jobs": 1, "progress": False}  # several progress bars would interleave
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(config, threads), daemon=False) for _ in range(sc.jobs)]
    print(f"study: {sc.jobs} worker processes, {threads} thread(s) each", flush=True)
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    finally:
        # The main process was stopped: SIGTERM asks each worker to save a checkpoint after its
        # current step and stop (as Ctrl-C does; a worker that got both still saves).
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()


def run_study(sc: StudyConfig) -> dict:
    jobs = study_jobs(sc)
    if sc.steps < 1 or sc.batch_size < 1 or not sc.seeds:
        raise SPTError("study: steps and batch size must be >= 1 and at least one seed given")
    if sc.jobs < 1:
        raise SPTError(f"study: --jobs must be >= 1, got {sc.jobs}")
    t0 = time.perf_counter()
    if sc.jobs > 1:
        _run_workers(sc)
    loaded = _load_inputs(sc)
    rows = [run_claimed(sc, name, spec, seed, loaded) for name, spec, seed in jobs]
    agg = write_report(sc, rows)
    print("\n" + format_markdown(agg), flush=True)
    print(f"\nwrote {Path(sc.output_dir) / 'results.json'} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return agg
