"""Reply metrics in the paper's table columns: F1, BLEU, ROUGE-1/2/L, BERTScore, Distinct-1/2.

Every score is on a 0..100 scale so the numbers line up with the paper's table. Heavy
dependencies (torch, transformers) load only when BERTScore is asked for.
"""
import os
from collections import Counter

import sacrebleu
from rouge_score import rouge_scorer

from ..errors import ModelLoadError, SPTError

def _check_pairs(preds, refs):
    """Lists of equal length; zip() would otherwise drop the tail silently."""
    preds, refs = list(preds), list(refs)
    if len(preds) != len(refs):
        raise SPTError(f"metrics: {len(preds)} predictions but {len(refs)} references")
    for name, texts in (("prediction", preds), ("reference", refs)):
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise SPTError(f"metrics: {name} {i} is {type(t).__name__}, not str")
    return preds, refs


def _f1_one(pred: str, ref: str, lowercase: bool = True) -> float:
    p, r = (pred.lower().split(), ref.lower().split()) if lowercase else (pred.split(), ref.split())
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    # Multiset overlap: a word repeated in the prediction counts only as often as in the reference.
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def unigram_f1(preds, refs, lowercase: bool = True) -> float:
    """Mean per-sample unigram F1 of whitespace tokens x100: lowercased (the default) or as
    written, the authors' evaluation (no normalisation at all)."""
    preds, refs = _check_pairs(preds, refs)
    if not preds:
        return 0.0
    return 100.0 * sum(_f1_one(p, r, lowercase) for p, r in zip(preds, refs)) / len(preds)


def bleu(preds, refs) -> float:
    """sacrebleu corpus BLEU with its default settings (13a tokeniser, exp smoothing)."""
    preds, refs = _check_pairs(preds, refs)
    return float(sacrebleu.corpus_bleu(preds, [refs]).score)


def rouge(preds, refs) -> dict:
    """Mean rouge-score F-measures x100.

    use_stemmer=False: the paper does not mention stemming, and the rouge-score default is off,
    so numbers stay comparable with a plain `RougeScorer(...)` call.
    """
    preds, refs = _check_pairs(preds, refs)
    keys = ("rouge1", "rouge2", "rougeL")
    if not preds:
        return {k: 0.0 for k in keys}
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=False)
    totals = dict.fromkeys(keys, 0.0)
    for p, r in zip(preds, refs):
        scores = scorer.score(r, p)  # rouge-score's order is (target, prediction)
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: 100.0 * totals[k] / len(preds) for k in keys}


def distinct(preds, n) -> float:
    """Corpus-level Distinct-n: unique / total n-grams over all predictions, x100.

    Tokens are whitespace-split as written (case kept); n-grams never span two predictions.
    """
    if n < 1:
        raise SPTError(f"distinct: n must be >= 1, got {n}")
    seen, total = set(), 0
    for text in preds:
        toks = text.split()
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return 100.0 * len(seen) / total if total else 0.0


# ---------------------------------------------------------------------------------------------
# BERTScore (own implementation, so no extra package and no hub download).


def _load_encoder(model_path: str):
    if not model_path or not os.path.isdir(model_path):
        raise ModelLoadError(f"bertscore: model folder not found: {model_path!r} "
                             "(give a local folder with config.json and tokenizer files)")
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        model = AutoModel.from_pretrained(model_path, local_files_only=True)
    except Exception as exc:  # transformers raises many types; the user needs the path and cause
        raise ModelLoadError(f"bertscore: cannot load model from {model_path!r}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"bertscore: {model_path!r} needs a fast tokenizer (tokenizer.json)")
    return tokenizer, model.eval()


# The layer the bert_score package uses for a model (its model2layers table); others: the last.
BERTSCORE_LAYERS = {"deberta-xlarge-mnli": 40}


def default_bertscore_layer(model_path: str, config) -> int | None:
    """bert_score's layer for this model, recognised by its folder or recorded name; None: last."""
    names = (os.path.basename(os.path.normpath(model_path)), str(getattr(config, "_name_or_path", "") or ""))
    for key, layer in BERTSCORE_LAYERS.items():
        if any(name == key or name.endswith("/" + key) for name in names):
            return layer
    return None


def _embed(texts, tokenizer, model, layer, max_len, device):
    """Unit-norm token embeddings [B, T, d], the tokens that can be matched (every real token,
    special ones included, as bert_score does) and the ones that count in the averages (no
    special tokens)."""
    import torch

    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len,
                    return_special_tokens_mask=True, return_tensors="pt")
    real = enc["attention_mask"].bool()
    counts = enc.pop("special_tokens_mask").eq(0) & real
    enc = {k: v.to(device) for k, v in enc.items()}
    with torch.inference_mode():
        out = model(**enc, output_hidden_states=layer is not None)
    hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]
    hidden = torch.nn.functional.normalize(hidden.float(), dim=-1)
    return hidden, real.to(device), counts.to(device)


def bertscore(preds, refs, model_path: str, layer: int | None = None, batch_size: int = 16) -> dict:
    """BERTScore P/R/F1 x100: greedy cosine matching of contextual token embeddings, as the
    bert_score package computes it without idf or baseline rescaling.

    `layer` picks `hidden_states[layer]` (0 = embedding output); None: bert_score's layer for a
    model it knows (BERTSCORE_LAYERS: 40 for microsoft/deberta-xlarge-mnli, the paper's), else the
    last. Special tokens ([CLS], [SEP]) can be the best match of a token but get weight 0 in the
    averages; padding never counts. A side with no scoring tokens (an empty reply) scores 0.
    """
    import torch
    from tqdm.auto import tqdm

    preds, refs = _check_pairs(preds, refs)
    if batch_size < 1:
        raise SPTError(f"bertscore: batch_size must be >= 1, got {batch_size}")
    tokenizer, model = _load_encoder(model_path)
    if layer is None:
        layer = default_bertscore_layer(model_path, model.config)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if layer is not None and n_layers is not None and not -n_layers - 1 <= layer <= n_layers:
        raise SPTError(f"bertscore: layer {layer} out of range for {model_path!r} "
                       f"({n_layers} layers: use 0..{n_layers}, or negative from the end)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    # tokenizer.model_max_length is often a huge sentinel; positions cap the real length.
    max_len = min(int(tokenizer.model_max_length),
                  int(getattr(model.config, "max_position_embeddings", 512) or 512), 512)

    ps, rs = [], []
    starts = range(0, len(preds), batch_size)
    for s in tqdm(starts, desc="bertscore", disable=None, leave=False):
        h, h_real, h_keep = _embed(preds[s:s + batch_size], tokenizer, model, layer, max_len, device)
        r, r_real, r_keep = _embed(refs[s:s + batch_size], tokenizer, model, layer, max_len, device)
        sim = torch.bmm(h, r.transpose(1, 2))  # [B, Th, Tr] cosines
        # Padding can never be the best match; special tokens can (they only weigh 0 below).
        sim = sim.masked_fill(~r_real[:, None, :], -2.0).masked_fill(~h_real[:, :, None], -2.0)
        best_for_hyp = sim.max(dim=2).values  # each prediction token's best reference match
        best_for_ref = sim.max(dim=1).values
        n_h, n_r = h_keep.sum(1), r_keep.sum(1)
        p = (best_for_hyp * h_keep).sum(1) / n_h.clamp(min=1)
        rec = (best_for_ref * r_keep).sum(1) / n_r.clamp(min=1)
        empty = (n_h == 0) | (n_r == 0)
        ps.append(p.masked_fill(empty, 0.0).cpu())
        rs.append(rec.masked_fill(empty, 0.0).cpu())

    if not ps:
        return {"bert_p": 0.0, "bert_r": 0.0, "bert_f1": 0.0}
    p, rec = torch.cat(ps).double(), torch.cat(rs).double()
    denom = p + rec
    # Negative cosine sums can make P+R <= 0; F1 is undefined there, count it as 0.
    f1 = torch.where(denom > 0, 2 * p * rec / denom.where(denom > 0, torch.ones_like(denom)),
                     torch.zeros_like(denom))
    return {"bert_p": 100.0 * p.mean().item(), "bert_r": 100.0 * rec.mean().item(),
            "bert_f1": 100.0 * f1.mean().item()}


# ---------------------------------------------------------------------------------------------


def compute_metrics(preds, refs, bertscore_model: str | None = None, bertscore_layer: int | None = None,
                    paper: bool = False) -> dict:
    """All table metrics for one run; `n` is the number of (prediction, reference) pairs.

    paper=True scores as the authors' evaluation does where it differs: F1 case-sensitive."""
    preds, refs = _check_pairs(preds, refs)
    if not preds:
        raise SPTError("metrics: no predictions to score")
    out = {"n": len(preds), "f1": unigram_f1(preds, refs, lowercase=not paper), "bleu": bleu(preds, refs)}
    out.update(rouge(preds, refs))
    out["dist1"] = distinct(preds, 1)
    out["dist2"] = distinct(preds, 2)
    if bertscore_model is not None:
        out.update(bertscore(preds, refs, bertscore_model, layer=bertscore_layer))
    return out


# (header, metric key); the order follows the paper's table, n last.
_COLUMNS = [("F1", "f1"), ("BLEU", "bleu"), ("R-1", "rouge1"), ("R-2", "rouge2"),
            ("R-L", "rougeL"), ("BERT-F1", "bert_f1"), ("DIST-1", "dist1"), ("DIST-2", "dist2"),
            ("n", "n")]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{float(value):.2f}"


def format_table(rows: dict[str, dict]) -> str:
    """A markdown table (also readable as plain text), one row per run name, 2 decimals.

    BERT-F1 appears only when some row has it; a missing value prints as '-'.
    """
    cols = [(h, k) for h, k in _COLUMNS
            if k != "bert_f1" or any("bert_f1" in m for m in rows.values())]
    header = ["run"] + [h for h, _ in cols]
    body = [[str(name)] + [_cell(m.get(k)) for _, k in cols] for name, m in rows.items()]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells):
        # Run names left-aligned, numbers right-aligned so decimals line up.
        parts = [c.ljust(w) if i == 0 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":")
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in body])
