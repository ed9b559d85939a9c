"""What --resume needs besides the trained tensors: the settings that must not change under a run,
the optimizer and RNG state as plain tensors + JSON (no pickle), and a log with each step once."""
import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..utils import write_text_atomic

# TrainConfig fields that never shape the trained weights: applied as given on a resume.
NOT_SHAPING = frozenset({"output_dir", "resume", "overwrite", "allow_changes", "progress", "eval_every",
                         "eval_samples", "save_every", "save_minutes", "dist_timeout",
                         "activation_checkpointing",  # (the same math, recomputed)
                         "batch_size"})  # (the per-process batch: its product with the world size counts)
# Fields that shape the run but may change on a resume when the user opts in (--allow-changes).
SAFE_TO_CHANGE = frozenset({"max_steps", "epochs", "lr", "retriever_lr", "weight_decay", "model"})


def run_settings(spt_cfg, tc, world: int = 1) -> dict:
    """Every setting that shapes a run, flat: SPT settings, then training settings. The batch is
    the global one (per-process batch x processes), so a run may resume on another world size."""
    out = {f"spt.{k}": v for k, v in spt_cfg.to_dict().items()}
    out.update({k: v for k, v in asdict(tc).items() if k not in NOT_SHAPING})
    out["global_batch"] = tc.batch_size * world
    return out


def compare_settings(recorded: dict, current: dict, allow_changes: bool, where: str) -> dict:
    """The changed settings {name: (old, new)}. Refuses (CheckpointError, one line listing each
    change) any change of a setting not safe to change, and safe ones unless allowed."""
    changed = {k: (recorded[k], current.get(k)) for k in recorded if k in current and recorded[k] != current[k]}
    unsafe = {k: v for k, v in changed.items() if k not in SAFE_TO_CHANGE}
    listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
    if unsafe:
        raise CheckpointError(f"{where}: --resume refuses changed settings ({listing}); these shape the run: "
                              "start a new run in another --output-dir to change them")
    if changed and not allow_changes:
        raise CheckpointError(f"{where}: --resume with changed settings ({listing}); add --allow-changes to "
                              "apply them (max steps, learning rates, weight decay and the model path may change)")
    return changed


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors, JSON) of an optimizer's state_dict: moments as tensors, the rest as JSON."""
    sd = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, state in sd["state"].items():
        meta["state"][str(idx)] = {}
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                meta["state"][str(idx)][key] = value
    return tensors, meta


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state = {}
    for idx, scalars in meta["state"].items():
        state[int(idx)] = dict(scalars)
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def load_rng_state(tensors: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():  # as many as this machine has (a resume may move machines)
        for i, state in cuda[:torch.cuda.device_count()]:
            torch.cuda.set_rng_state(state, i)


def read_log(path: Path, up_to_step: int) -> list[dict]:
    """The log's records for steps 1..up_to_step, each once (the last line of a step wins)."""
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        step = record.get("step")
        if isinstance(step, int) and step <= up_to_step:
            by_step[step] = record
    return [by_step[s] for s in sorted(by_step)]


def rewrite_log(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))

