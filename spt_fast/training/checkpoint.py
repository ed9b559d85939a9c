"""Checkpoints: trainable tensors in safetensors + a JSON config, written atomically.

Layout of an output folder:
    DIR/checkpoint-000120/spt.safetensors   prompts, retriever.weight, retriever.bias
    DIR/checkpoint-000120/config.json       SPT config, base model, width, step, training settings
    DIR/checkpoint-000120/trainer_state.pt  optimizer + RNG + data position, for --resume
    DIR/latest                              name of the newest complete checkpoint
A checkpoint folder is built under a temporary name and renamed into place, and `latest` is
replaced atomically afterwards, so a crash at any point leaves the previous checkpoint intact.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import CheckpointError
from ..utils import make_temp_dir, save_tensors_atomic, write_text_atomic

TENSORS = "spt.safetensors"
CONFIG = "config.json"
STATE = "trainer_state.pt"
LATEST = "latest"


def save(output_dir, step: int, tensors: dict, config: dict, trainer_state: dict | None = None,
         keep: int = 2) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{step:06d}"
    tmp = make_temp_dir(out, f".{name}.")
    try:
        save_tensors_atomic(tmp / TENSORS, tensors)
        write_text_atomic(tmp / CONFIG, json.dumps(config, indent=2, sort_keys=True))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE)
        final = out / name
        if final.exists():  # re-saving the same step (e.g. after a resume): swap, then drop the old
            trash = Path(tempfile.mkdtemp(prefix=f".old-{name}.", dir=out))
            os.replace(final, trash / name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(out / LATEST, name + "\n")
    _prune(out, keep, current=name)
    return out / name


def _prune(out: Path, keep: int, current: str) -> None:
    found = sorted(p for p in out.glob("checkpoint-*") if p.is_dir())
    for old in found[:-keep] if keep > 0 else []:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def resolve(path) -> Path:
    """A checkpoint folder from either itself or an output folder holding `latest`."""
    p = Path(path)
    if (p / TENSORS).is_file():
        return p
    if (p / LATEST).is_file():
        name = (p / LATEST).read_text().strip()
        if (p / name / TENSORS).is_file():
            return p / name
        raise CheckpointError(f"{p / LATEST}: points to '{name}', which is missing or incomplete")
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint folder")
    raise CheckpointError(f"{p}: not a checkpoint (no {TENSORS} and no '{LATEST}' file)")


def load(path) -> tuple[dict, dict, Path]:
    """(tensors, config, folder) of a checkpoint."""
    folder = resolve(path)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: missing {CONFIG}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / CONFIG}: not valid JSON ({exc})") from None
    try:
        tensors = load_file(str(folder / TENSORS))
    except Exception as exc:
        raise CheckpointError(f"{folder / TENSORS}: cannot read ({exc})") from None
    return tensors, config, folder


def load_trainer_state(folder: Path) -> dict | None:
    path = Path(folder) / STATE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def load_for_inference(ckpt, model: str | None = None, dtype: str | None = None, load_4bit: bool | None = None,
                       layout: str | None = None):
    """(SPT model, tokenizer, checkpoint config) from a checkpoint folder or an output folder: the
    base model recorded there (or `model`), in the recorded dtype / 4-bit setting unless given."""
    from ..model.build import build_spt_model
    from ..model.loading import load as load_base
    from ..model.spt import SPTConfig
    from ..utils import resolve_dtype

    tensors, config, folder = load(ckpt)
    train = config.get("train", {})
    model_path = model or config.get("model") or train.get("model", "default")
    changes = {"layout": layout} if layout else {}
    recorded = config.get("spt", {}).get("layout")
    if not layout and recorded == "shared" and "placement" not in config:
        # Trained before 'shared' put the prompt before the final " R:" tag: keep its placement.
        print(f"note: {folder} was trained with the first shared placement [context][P][response]; "
              "using layout 'shared-old' for it", flush=True)
        changes = {"layout": "shared-old"}
    spt_cfg = SPTConfig.from_dict(config.get("spt", {})).replace(**changes)
    if spt_cfg.init == "text":
        spt_cfg = spt_cfg.replace(init="vocab")  # the tensors are loaded right after; no need to re-tokenize
    base, tok = load_base(model_path, resolve_dtype(dtype or train.get("dtype", "fp32")),
                     train.get("load_4bit", False) if load_4bit is None else load_4bit)
    width = base.get_input_embeddings().weight.shape[1]
    if config.get("hidden_size") not in (None, width):
        raise CheckpointError(
            f"{folder}: trained for a model of width {config['hidden_size']}, but {model_path} has width {width}"
        )
    spt = build_spt_model(base, spt_cfg, tok)
    spt.load_trainable_state_dict(tensors, str(folder / TENSORS))
    spt.eval()
    return spt, tok, config
