"""The main job on the embedded default: train SPT (K=4) and the PT baseline (K=1) with the same
steps on the chit-chat corpus, then generate on the same held-out samples and print the table."""
import json
import time
from pathlib import Path

from .evaluate import evaluate, write_predictions
from .metrics import format_table
from .model_io import load
from .plots import plot_prompt_usage
from .spt import SPTConfig
from .train import TrainConfig, Trainer, load_splits
from .utils import resolve_dtype


def run_demo(output_dir="runs/demo", model="default", data="chitchat", data_format=None, steps=60,
             batch_size=2, eval_samples=64, num_prompts=4, prompt_len=8, layout="prefix", max_len=128,
             lr=3e-3, retriever_lr=1e-4, seed=0, progress=True) -> dict:
    t0 = time.perf_counter()
    out = Path(output_dir)
    tc = TrainConfig(model=model, data=data, data_format=data_format, max_steps=steps, batch_size=batch_size,
                     lr=lr, retriever_lr=retriever_lr, seed=seed, eval_samples=32, progress=progress)
    splits = load_splits(tc)
    base, tok = load(model, resolve_dtype(tc.dtype))
    runs = {
        f"SPT (K={num_prompts})": SPTConfig(num_prompts=num_prompts, prompt_len=prompt_len, layout=layout,
                                           max_len=max_len, seed=seed),
        "PT (K=1)": SPTConfig.prompt_tuning(prompt_len=prompt_len, layout=layout, max_len=max_len, seed=seed),
    }
    rows, summary = {}, {}
    held_out = splits[1][:eval_samples]
    for name, cfg in runs.items():
        slug = "spt" if cfg.num_prompts > 1 else "pt"
        run_tc = TrainConfig(**{**tc.__dict__, "output_dir": str(out / slug)})
        trainer = Trainer(cfg, run_tc, model=base, tokenizer=tok, splits=splits)
        print(f"== training {name}: {steps} steps, batch {batch_size}, layout {trainer.model.config.layout}",
              flush=True)
        train_summary = trainer.fit()
        print(f"== evaluating {name} on {len(held_out)} held-out samples", flush=True)
        result = evaluate(trainer.model, tok, held_out, progress=progress)
        write_predictions(out / slug / "predictions.jsonl", result)
        if cfg.num_prompts > 1:
            plot = plot_prompt_usage(result["turns"], result["picks"], cfg.num_prompts,
                                     out / slug / "prompt_usage.png", title=f"{name}: prompt usage per turn")
            train_summary["prompt_usage_plot"] = str(plot)
        rows[name] = result["metrics"]
        summary[name] = {"metrics": result["metrics"], "train": train_summary}
    table = format_table(rows)
    print("\n" + table, flush=True)
    summary["wall_seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out / 'results.json'} ({summary['wall_seconds']:.0f}s in all)", flush=True)
    return summary
