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
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

TENSORS = "spt.safetensors"
CONFIG = "config.json"
STATE = "trainer_state.pt"
LATEST = "latest"


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results and configs are for everyone to read
    os.replace(tmp, path)


def save(output_dir, step: int, tensors: dict, config: dict, trainer_state: dict | None = None,
         keep: int = 2) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
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
    _write_text_atomic(out / LATEST, name + "\n")
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
