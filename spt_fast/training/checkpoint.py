"""Checkpoints: tensors in safetensors, everything else in JSON, written atomically; no pickles.

Layout of an output folder:
    DIR/checkpoint-000120/spt.safetensors            prompts, retriever weight/bias/statistics
    DIR/checkpoint-000120/config.json                SPT config, base model, width, step, training settings
    DIR/checkpoint-000120/trainer_state.safetensors  optimizer moments, RNG state (for --resume)
    DIR/checkpoint-000120/trainer_state.json         step, data position, optimizer settings
    DIR/latest                                       name of the newest complete checkpoint
    DIR/train_log.jsonl                              one line per step
A checkpoint folder is built under a temporary name and renamed into place, and `latest` is
replaced atomically afterwards, so a crash at any point leaves the previous checkpoint intact;
a damaged newest checkpoint is skipped for the newest intact one. Nothing is ever unpickled: a
trainer state written with pickle by an older version is refused, since a pickle can run code.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import CheckpointError
from ..utils import make_temp_dir, save_tensors_atomic, write_text_atomic

TENSORS = "spt.safetensors"
CONFIG = "config.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
PICKLED_STATE = "trainer_state.pt"  # older versions: never loaded
LATEST = "latest"
LOG = "train_log.jsonl"
PREFIX = "checkpoint-"


def save(output_dir, step: int, tensors: dict, config: dict, trainer_state: tuple[dict, dict] | None = None,
         keep: int = 2) -> Path:
    """Write checkpoint-<step> (tensors, config and, for resuming, (state tensors, state JSON))."""
    out = Path(output_dir)
    name = f"{PREFIX}{step:06d}"
    tmp = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out, f".{name}.")
        save_tensors_atomic(tmp / TENSORS, tensors)
        write_text_atomic(tmp / CONFIG, json.dumps(config, indent=2, sort_keys=True))
        if trainer_state is not None:
            save_tensors_atomic(tmp / STATE_TENSORS, trainer_state[0])
            write_text_atomic(tmp / STATE_JSON, json.dumps(trainer_state[1], indent=1, sort_keys=True))
        final = out / name
        if final.exists():  # re-saving the same step (e.g. after a resume): swap, then drop the old
            trash = make_temp_dir(out, f".old-{name}.")
            os.replace(final, trash / name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        tmp = None
        write_text_atomic(out / LATEST, name + "\n")
    except OSError as exc:
        raise CheckpointError(f"{out / name}: cannot write the checkpoint ({exc.strerror or exc}); "
                              "the previous checkpoint is intact") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _prune(out, keep, current=name)
    return out / name


def _step_of(folder: Path) -> int:
    try:
        return int(folder.name[len(PREFIX):])
    except ValueError:
        return -1


def _prune(out: Path, keep: int, current: str) -> None:
    """Keep the newest `keep` checkpoints up to the current one; a checkpoint of a later step is
    from a run that was resumed from before it (e.g. it was damaged): it goes too."""
    now = _step_of(out / current)
    found = sorted((p for p in out.glob(f"{PREFIX}*") if p.is_dir() and _step_of(p) >= 0), key=_step_of)
    later = [p for p in found if _step_of(p) > now]
    earlier = [p for p in found if _step_of(p) <= now]
    for old in later + (earlier[:-keep] if keep > 0 else []):
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def clean_stale(output_dir) -> list[str]:
    """Remove what an interrupted save left behind (temporary folders and files); their names."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    gone = []
    for p in out.iterdir():
        if p.name.startswith((f".{PREFIX}", f".old-{PREFIX}")) or (p.name.startswith(".") and p.name.endswith(".tmp")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


def holds_run(output_dir) -> bool:
    """True when the folder already holds a training run (checkpoints, a latest pointer or a log)."""
    out = Path(output_dir)
    return out.is_dir() and ((out / LATEST).exists() or (out / LOG).exists() or any(out.glob(f"{PREFIX}*")))


def holds_checkpoint(output_dir) -> bool:
    out = Path(output_dir)
    return out.is_dir() and ((out / LATEST).exists() or any(p.is_dir() for p in out.glob(f"{PREFIX}*")))


def remove_run(output_dir) -> None:
    """Remove a training run's own files from the folder (nothing else that lives there)."""
    out = Path(output_dir)
    for p in [out / LATEST, out / LOG, *out.glob(f"{PREFIX}*")]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    clean_stale(out)


def problem(folder: Path, need_state: bool = False) -> str | None:
    """Why this checkpoint folder cannot be used, or None when it is intact."""
    if need_state and not (folder / STATE_JSON).is_file() and (folder / PICKLED_STATE).is_file():
        return (f"its {PICKLED_STATE} was saved with pickle by an older spt_fast and is never loaded, since a "
                "pickle can run code; --resume needs a checkpoint written by this version")
    files = [TENSORS, CONFIG] + ([STATE_TENSORS, STATE_JSON] if need_state else [])
    for name in files:
        if not (folder / name).is_file():
            return f"{name} missing"
    try:
        json.loads((folder / CONFIG).read_text())
        if need_state:
            json.loads((folder / STATE_JSON).read_text())
        for name in [TENSORS] + ([STATE_TENSORS] if need_state else []):
            with safe_open(str(folder / name), "pt") as f:
                f.keys()
    except Exception as exc:  # any reader error means damaged
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def resolve(path, need_state: bool = False) -> Path:
    """A checkpoint folder from either itself or an output folder holding `latest`.

    When the newest checkpoint of an output folder is damaged, the newest intact one is used,
    with a warning naming the damaged one."""
    p = Path(path)
    if (p / TENSORS).is_file() or (p / CONFIG).is_file():
        why = problem(p, need_state)
        if why:
            raise CheckpointError(f"{p}: damaged checkpoint ({why})")
        return p
    candidates = sorted((c for c in p.glob(f"{PREFIX}*") if c.is_dir()), key=_step_of, reverse=True) \
        if p.is_dir() else []
    if (p / LATEST).is_file():
        named = p / (p / LATEST).read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    if not candidates:
        if not p.exists():
            raise CheckpointError(f"{p}: no such checkpoint folder")
        raise CheckpointError(f"{p}: not a checkpoint (no {TENSORS} and no '{LATEST}' file)")
    damaged = []
    for c in candidates:
        why = problem(c, need_state)
        if why is None:
            if damaged:
                print(f"warning: {'; '.join(damaged)}; using {c}", file=sys.stderr, flush=True)
            return c
        damaged.append(f"{c} is damaged ({why})")
    raise CheckpointError(f"{p}: no intact checkpoint ({'; '.join(damaged)})")


def load(path, need_state: bool = False) -> tuple[dict, dict, Path]:
    """(tensors, config, folder) of a checkpoint."""
    folder = resolve(path, need_state)
    try:
        config = json.loads((folder / CONFIG).read_text())
        tensors = load_file(str(folder / TENSORS))
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot read ({exc})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{folder / TENSORS}: tensor '{bad[0]}' holds NaN or infinite values")
    return tensors, config, folder


def load_trainer_state(folder: Path) -> tuple[dict, dict]:
    """(state tensors, state JSON) of a checkpoint folder, for --resume."""
    folder = Path(folder)
    if not (folder / STATE_JSON).is_file():
        if (folder / PICKLED_STATE).is_file():
            raise CheckpointError(
                f"{folder / PICKLED_STATE}: a trainer state saved with pickle (an older spt_fast) is never "
                "loaded, since a pickle can run code; its prompts still load for eval/generate, but "
                "--resume needs a checkpoint written by this version")
        raise CheckpointError(f"{folder}: no {STATE_JSON}, cannot resume")
    try:
        return load_file(str(folder / STATE_TENSORS)), json.loads((folder / STATE_JSON).read_text())
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot read the trainer state ({exc})") from None


def load_for_inference(ckpt, model: str | None = None, dtype: str | None = None, load_4bit: bool | None = None,
                       layout: str | None = None):
    """(SPT model, tokenizer, checkpoint config) from a checkpoint folder or an output folder: the
    base model recorded there (or `model`), in the recorded dtype / 4-bit setting unless given."""
    from ..errors import ModelLoadError
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
    try:
        base, tok = load_base(model_path, resolve_dtype(dtype or train.get("dtype", "fp32")),
                              train.get("load_4bit", False) if load_4bit is None else load_4bit)
    except ModelLoadError as exc:
        if model:
            raise
        raise ModelLoadError(f"{exc}; this is the base model recorded in {folder / CONFIG}: pass --model PATH "
                             "(or model= in the API) to point at where it is on this machine") from None
    width = base.get_input_embeddings().weight.shape[1]
    if config.get("hidden_size") not in (None, width):
        raise CheckpointError(
            f"{folder}: trained for a model of width {config['hidden_size']}, but {model_path} has width {width}"
        )
    spt = build_spt_model(base, spt_cfg, tok)
    spt.load_trainable_state_dict(tensors, str(folder / TENSORS))
    spt.eval()
    return spt, tok, config
