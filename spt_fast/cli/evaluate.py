"""`spt-fast eval`: the engine's replies to held-out samples, scored with the paper's metrics."""
from pathlib import Path

from ..data.corpora import load_samples, split_by_dialog
from ..evaluation.evaluate import evaluate, write_predictions
from ..evaluation.metrics import format_table
from ..evaluation.plots import plot_prompt_usage
from ..generation.decoding import GenConfig
from ..utils import check_number, dtype_name
from .common import HelpFormatter, add_compile_arg, add_data_args, add_model_args, check_writable, write_json


def add_parser(sub) -> None:
    g = GenConfig()
    p = sub.add_parser("eval", help="generate for held-out samples and print F1/BLEU/ROUGE/Distinct",
                       formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder or a training output folder")
    add_model_args(p, from_checkpoint=True)
    add_data_args(p)
    p.add_argument("--split", choices=("auto", "valid", "all"), default="auto",
                   help="auto: the held-out 5%% for chitchat, the whole file otherwise")
    p.add_argument("--max-eval-samples", "--max-samples", dest="max_samples", type=int, default=None,
                   help="score the first N samples (default: all of them, e.g. the whole ConvAI2 valid file)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=g.max_new_tokens)
    p.add_argument("--selection-noise", type=float, default=g.selection_noise,
                   help="std of Gaussian noise on retriever scores")
    p.add_argument("--bertscore-model", default=None,
                   help="local model folder for BERTScore (optional; the paper's: microsoft/deberta-xlarge-mnli)")
    p.add_argument("--bertscore-layer", type=int, default=None,
                   help="hidden layer for BERTScore (default: the bert_score package's for a model it knows, "
                        "40 for deberta-xlarge-mnli, else the last)")
    p.add_argument("--paper-metrics", action="store_true",
                   help="evaluate as the authors' code: replies cut at a newline or any ':', case-sensitive F1, "
                        "ConvAI2 __SILENCE__ turns kept in the history")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    add_compile_arg(p)
    p.add_argument("--json", default=None, help="write the metrics here")
    p.add_argument("--predictions", default=None, help="write predictions (JSONL) here")
    p.add_argument("--plot", default=None, help="write the prompt-usage-per-turn PNG here")
    p.add_argument("--no-progress", action="store_true")


def eval_samples(a):
    samples = load_samples(a.data, a.data_format, keep_silence=a.paper_metrics)
    split = a.split
    if split == "auto":
        split = "valid" if a.data == "chitchat" or a.data_format == "chitchat" else "all"
    if split == "valid":
        samples = split_by_dialog(samples)[1]
    return samples


def run(a) -> None:
    from ..generation.engine import Engine

    for flag, value in (("--json", a.json), ("--predictions", a.predictions), ("--plot", a.plot)):
        check_writable(value, flag)  # before loading and generating, not after
    check_number("--batch-size", a.batch_size, 1, strict=False, integer=True)
    check_number("--max-new-tokens", a.max_new_tokens, 1, strict=False, integer=True)
    check_number("--selection-noise", a.selection_noise, strict=False)
    if a.max_samples is not None:
        check_number("--max-samples", a.max_samples, 1, strict=False, integer=True)
    samples = eval_samples(a)
    engine = Engine.from_checkpoint(a.checkpoint, device=a.device, dtype=a.dtype, model=a.model,
                                    load_4bit=a.load_4bit, weights=a.weights, compile=a.compile)
    result = evaluate(engine, samples, a.max_samples, a.batch_size, a.max_new_tokens, a.bertscore_model,
                      a.selection_noise, progress=not a.no_progress, paper=a.paper_metrics,
                      bertscore_layer=a.bertscore_layer)
    K = engine.config.num_prompts
    print(format_table({f"{Path(a.checkpoint).name} (K={K})": result["metrics"]}))
    if a.json:
        write_json(a.json, {**result["metrics"], "checkpoint": a.checkpoint, "K": K,
                            "dtype": dtype_name(engine.spt.dtype), "weights": a.weights or "full",
                            "compile": str(engine.compile),
                            "usage": [result["picks"].count(k) for k in range(K)]})
    if a.predictions:
        write_predictions(a.predictions, result)
    if a.plot:
        plot_prompt_usage(result["turns"], result["picks"], K, a.plot)
