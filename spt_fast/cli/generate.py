"""`spt-fast generate`: reply to one context, or to each row of a JSONL file, through the engine."""
import json

from ..data.corpora import load_contexts
from ..errors import SPTError
from ..generation.decoding import GenConfig
from ..utils import check_number
from .common import HelpFormatter, add_compile_arg, add_model_args


def add_parser(sub) -> None:
    g = GenConfig()
    p = sub.add_parser("generate", help="reply to one context (or each row of a JSONL file)",
                       formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True)
    add_model_args(p, from_checkpoint=True)
    p.add_argument("--persona", action="append", default=[], help="a persona sentence (repeat for more)")
    p.add_argument("--history", action="append", default=[],
                   help="an utterance, oldest first; the last one is the partner's (repeat for more)")
    p.add_argument("--input", default=None, help="JSONL rows {persona, history}; prints one JSON reply per row")
    p.add_argument("--max-new-tokens", type=int, default=g.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--selection-noise", type=float, default=g.selection_noise)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    add_compile_arg(p)


def run(a) -> None:
    from ..generation.engine import Engine

    if a.input:
        convs = [(s.persona, s.history) for s in load_contexts(a.input)]
    elif a.history:
        convs = [(a.persona, a.history)]
    else:
        raise SPTError("generate: give at least one --history utterance (the partner's last message), or --input FILE")
    check_number("--batch-size", a.batch_size, 1, strict=False, integer=True)
    check_number("--max-new-tokens", a.max_new_tokens, 1, strict=False, integer=True)
    check_number("--selection-noise", a.selection_noise, strict=False)
    engine = Engine.from_checkpoint(a.checkpoint, device=a.device, dtype=a.dtype, model=a.model,
                                    load_4bit=a.load_4bit, weights=a.weights, compile=a.compile)
    opts = dict(max_new_tokens=a.max_new_tokens, selection_noise=a.selection_noise, seed=0)
    engine.options(**opts)  # bad options fail before any generation
    for start in range(0, len(convs), a.batch_size):
        for r in engine.generate(convs[start:start + a.batch_size], **opts):
            print(json.dumps({"reply": r.text, "prompt": r.prompt}) if a.input else f"[prompt {r.prompt}] {r.text}")
