"""`spt-fast demo`, the main job on the embedded default: train SPT (K=4) and the PT baseline (K=1)
with the same steps on the chit-chat corpus, then let the engine reply to the same held-out
samples and print the metrics table."""
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.corpora import FORMATS
from ..evaluation.evaluate import evaluate, write_predictions
from ..evaluation.metrics import format_table
from ..evaluation.plots import plot_prompt_usage
from ..generation.engine import Engine
from ..model.layouts import layout_choices
from ..model.loading import load
from ..model.spt import SPTConfig
from ..training.trainer import TrainConfig, Trainer, load_splits
from ..utils import resolve_dtype, write_text_atomic
from .common import HelpFormatter


@dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    model: str = "default"
    data: str = "chitchat"
    data_format: str | None = None
    max_steps: int = 60
    batch_size: int = 2
    eval_samples: int = 64
    num_prompts: int = 4
    prompt_len: int = 8
    layout: str = "auto"
    max_len: int = 128
    lr: float = 3e-3  # a short run needs more than the paper's 1e-4 for the prompts
    retriever_lr: float = 1e-3
    seed: int = 0
    progress: bool = True


def run_demo(dc: DemoConfig) -> dict:
    t0 = time.perf_counter()
    out = Path(dc.output_dir)
    tc = TrainConfig(model=dc.model, data=dc.data, data_format=dc.data_format, max_steps=dc.max_steps,
                     batch_size=dc.batch_size, lr=dc.lr, retriever_lr=dc.retriever_lr, seed=dc.seed, eval_samples=32,
                     progress=dc.progress)
    splits = load_splits(tc)
    base, tok = load(dc.model, resolve_dtype(tc.dtype))
    common = dict(prompt_len=dc.prompt_len, layout=dc.layout, max_len=dc.max_len, seed=dc.seed)
    runs = {f"SPT (K={dc.num_prompts})": SPTConfig(num_prompts=dc.num_prompts, **common),
            "PT (K=1)": SPTConfig.prompt_tuning(**common)}
    rows, summary = {}, {}
    held_out = splits[1][:dc.eval_samples]
    for name, cfg in runs.items():
        slug = "spt" if cfg.num_prompts > 1 else "pt"
        # The demo's own folders: a second demo replaces the first one's runs.
        run_tc = TrainConfig(**{**asdict(tc), "output_dir": str(out / slug), "overwrite": True})
        trainer = Trainer(cfg, run_tc, model=base, tokenizer=tok, splits=splits)
        print(f"== training {name}: {dc.max_steps} steps, batch {dc.batch_size}, layout "
              f"{trainer.model.config.layout}", flush=True)
        train_summary = trainer.fit()
        print(f"== evaluating {name} on {len(held_out)} held-out samples", flush=True)
        result = evaluate(Engine(trainer.model, tok), held_out, progress=dc.progress)
        write_predictions(out / slug / "predictions.jsonl", result)
        if cfg.num_prompts > 1:
            plot = plot_prompt_usage(result["turns"], result["picks"], cfg.num_prompts,
                                     out / slug / "prompt_usage.png", title=f"{name}: prompt usage per turn")
            train_summary["prompt_usage_plot"] = str(plot)
        rows[name] = result["metrics"]
        summary[name] = {"metrics": result["metrics"], "train": train_summary}
    print("\n" + format_table(rows), flush=True)
    summary["wall_seconds"] = time.perf_counter() - t0
    write_text_atomic(out / "results.json", json.dumps(summary, indent=2))
    print(f"\nwrote {out / 'results.json'} ({summary['wall_seconds']:.0f}s in all)", flush=True)
    return summary


def add_parser(sub) -> None:
    d = DemoConfig()
    p = sub.add_parser("demo", help="the main job: SPT (K=4) vs PT (K=1) on the embedded default, then the table",
                       formatter_class=HelpFormatter)
    p.add_argument("--data", default=d.data,
                   help="'chitchat' (the corpus of the chitchat-dataset package) or a ConvAI2 .txt / JSONL file")
    p.add_argument("--data-format", choices=FORMATS, default=d.data_format)
    p.add_argument("--model", default=d.model)
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--layout", choices=layout_choices(), default=d.layout)
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--lr", type=float, default=d.lr, help="soft-prompt learning rate (a short run needs more than 1e-4)")
    p.add_argument("--retriever-lr", type=float, default=d.retriever_lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--no-progress", action="store_true")


def run(a) -> dict:
    return run_demo(DemoConfig(output_dir=a.output_dir, model=a.model, data=a.data, data_format=a.data_format,
                               max_steps=a.max_steps, batch_size=a.batch_size, eval_samples=a.eval_samples,
                               layout=a.layout, max_len=a.max_len, lr=a.lr, retriever_lr=a.retriever_lr,
                               seed=a.seed, progress=not a.no_progress))
