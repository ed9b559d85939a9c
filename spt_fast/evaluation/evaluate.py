"""Evaluation: replies from the generation engine for held-out samples, scored with the paper's
metrics (evaluation.metrics)."""
import json
from pathlib import Path

from ..data.text import Encoder
from ..generation.stops import PAPER_STOP_STRINGS, STOP_STRINGS
from ..utils import write_text_atomic
from .metrics import compute_metrics


def evaluate(engine, samples, max_samples: int | None = None, batch_size: int = 16, max_new_tokens: int = 32,
             bertscore_model: str | None = None, noise: float = 0.0, seed: int = 0, progress: bool = True,
             paper: bool = False, bertscore_layer: int | None = None) -> dict:
    """Metrics plus the raw predictions, chosen prompts and turn indices.

    `engine` is a generation.engine.Engine: the replies scored are the ones users get. Greedy
    decoding; `noise` > 0 adds Gaussian selection noise to the retriever's scores (seeded).
    paper=True evaluates as the authors' code does where it differs: replies cut at a newline or
    any ':', F1 case-sensitive (give it samples loaded with keep_silence=True as well).
    """
    from tqdm.auto import tqdm

    if max_samples:
        samples = samples[:max_samples]
    spt, tokenizer = engine.spt, engine.tokenizer
    enc = Encoder(tokenizer, spt.config.max_len, spt.config.prompt_len)
    kept, encoded = [], []
    for s in samples:
        # Budget the context as in training (response included) so train and test contexts match.
        e = enc.encode(s, with_response=True)
        if e is not None:
            kept.append(s)
            encoded.append(e)
    preds, picks = [], []
    for i, start in enumerate(tqdm(range(0, len(encoded), batch_size), desc="generate", disable=not progress)):
        part = encoded[start:start + batch_size]
        replies = engine.generate_ids([e.context_ids for e in part], [e.tag_len for e in part],
                                      max_new_tokens=max_new_tokens, selection_noise=noise, seed=seed + i,
                                      stops=PAPER_STOP_STRINGS if paper else STOP_STRINGS)
        preds += [r.text for r in replies]
        picks += [r.prompt for r in replies]
    refs = [s.response for s in kept]
    metrics = compute_metrics(preds, refs, bertscore_model, bertscore_layer, paper=paper)
    # Replies that came out empty (a stop string or eos first): the layout's first-token failure.
    metrics["empty"] = 100.0 * sum(not p for p in preds) / max(len(preds), 1)
    return {"metrics": metrics, "preds": preds, "refs": refs, "picks": picks,
            "turns": [s.turn for s in kept], "skipped": enc.n_skipped}


def write_predictions(path, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prediction": p, "reference": r, "prompt": k, "turn": t})
             for p, r, k, t in zip(result["preds"], result["refs"], result["picks"], result["turns"])]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
