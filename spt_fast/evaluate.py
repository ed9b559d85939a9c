"""Evaluation: generate replies for held-out samples and score them with the paper's metrics."""
from pathlib import Path

import torch

from . import checkpoint
from .engine import build_spt_model
from .errors import CheckpointError
from .generate import generate
from .metrics import compute_metrics
from .model_io import load
from .spt import SPTConfig
from .text import Encoder
from .utils import resolve_dtype


def load_for_inference(ckpt: str, model: str | None = None, dtype: str | None = None,
                       load_4bit: bool | None = None, layout: str | None = None):
    """(SPTModel, tokenizer, checkpoint config) from a checkpoint folder or an output folder."""
    tensors, config, folder = checkpoint.load(ckpt)
    train = config.get("train", {})
    model_path = model or config.get("model") or train.get("model", "default")
    spt_cfg = SPTConfig.from_dict(config.get("spt", {}))
    if layout:
        spt_cfg.layout = layout
    base, tok = load(model_path, resolve_dtype(dtype or train.get("dtype", "fp32")),
                     train.get("load_4bit", False) if load_4bit is None else load_4bit)
    width = base.get_input_embeddings().weight.shape[1]
    if config.get("hidden_size") not in (None, width):
        raise CheckpointError(
            f"{folder}: trained for a model of width {config['hidden_size']}, but {model_path} has width {width}"
        )
    if spt_cfg.init == "text":
        spt_cfg.init = "vocab"  # the tensors are loaded right after; no need to re-tokenize the init text
    spt = build_spt_model(base, spt_cfg, tok)
    spt.load_trainable_state_dict(tensors, str(folder / checkpoint.TENSORS))
    spt.eval()
    return spt, tok, config


def evaluate(spt, tokenizer, samples, max_samples: int | None = None, batch_size: int = 16,
             max_new_tokens: int = 32, bertscore_model: str | None = None, noise: float = 0.0,
             progress: bool = True) -> dict:
    """Metrics plus the raw predictions, chosen prompts and turn indices."""
    if max_samples:
        samples = samples[:max_samples]
    enc = Encoder(tokenizer, spt.config.max_len, spt.config.prompt_len)
    kept, encoded = [], []
    for s in samples:
        # Budget the context as in training (response included) so train and test contexts match.
        e = enc.encode(s, with_response=True)
        if e is None:
            continue
        e.response_ids = []
        kept.append(s)
        encoded.append(e)
    with torch.no_grad():
        preds, picks = generate(spt, tokenizer, encoded, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, noise=noise, progress=progress)
    refs = [s.response for s in kept]
    metrics = compute_metrics(preds, refs, bertscore_model)
    return {"metrics": metrics, "preds": preds, "refs": refs, "picks": picks,
            "turns": [s.turn for s in kept], "skipped": enc.n_skipped}


def write_predictions(path, result: dict) -> None:
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p, r, k, t in zip(result["preds"], result["refs"], result["picks"], result["turns"]):
            f.write(json.dumps({"prediction": p, "reference": r, "prompt": k, "turn": t}) + "\n")
