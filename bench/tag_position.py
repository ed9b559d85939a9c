"""The experiment that led to the shared layout's placement: PT (K=1) with the soft prompt placed
*before* the final ` R:` tag, `[context][P][ R:][response]` (now the built-in `shared` layout),
trained and scored like the first quality study's pt runs (40 steps x batch 2, seeds 0 1 2, 48
held-out samples); its results are docs/study/tag_position.json.

    python bench/tag_position.py --output docs/study/tag_position.json
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from spt_fast.evaluation.study import first_token_stats
from spt_fast.model.loading import load
from spt_fast.model.spt import SPTConfig
from spt_fast.training.trainer import TrainConfig, Trainer, load_splits

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/tag_position.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args(argv)
    splits = load_splits(TrainConfig())
    held_out = splits[1][:48]
    base, tok = load("default", torch.float32)
    rows = []
    for seed in a.seeds:
        cfg = SPTConfig.prompt_tuning(prompt_len=8, layout="shared", max_len=128, seed=seed)
        tc = TrainConfig(output_dir=str(Path(a.output).with_suffix("") / f"seed{seed}"), max_steps=a.steps,
                         batch_size=2, lr=3e-3, retriever_lr=1e-4, seed=seed, eval_samples=48, progress=False)
        trainer = Trainer(cfg, tc, model=base, tokenizer=tok, splits=splits)
        summary = trainer.fit()
        row = {"run": "pt-tag-first", "seed": seed, "steps": summary["steps"], "val_loss": summary["val_loss"],
               **first_token_stats(trainer.model, tok, held_out)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
