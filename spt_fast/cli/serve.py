"""`spt-fast serve`: an OpenAI-compatible HTTP server for a trained checkpoint (spt_fast.serving)."""
from .common import HelpFormatter, add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="HTTP server: OpenAI chat completions with continuous batching",
                       formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder or a training output folder")
    add_model_args(p, from_checkpoint=True, bf16_default=False)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (requests served at once)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which the server answers 503")
    p.add_argument("--max-tokens", type=int, default=256, help="the largest max_tokens a request may ask for")
    p.add_argument("--cache-mb", type=float, default=256,
                   help="memory for the context cache (shared layouts: KV of conversations' contexts, reused)")


def run(a) -> None:
    from ..generation.engine import Engine
    from ..serving.app import serve
    from ..utils import check_number

    for flag, value in (("--max-batch", a.max_batch), ("--max-queue", a.max_queue), ("--max-tokens", a.max_tokens),
                        ("--port", a.port)):
        check_number(flag, value, 0 if flag == "--port" else 1, strict=False, integer=True)
    check_number("--cache-mb", a.cache_mb, strict=False)
    engine = Engine.for_serving(a.checkpoint, device=a.device, dtype=a.dtype, model=a.model, load_4bit=a.load_4bit,
                                weights=a.weights)
    print(f"spt-fast serve: {a.checkpoint} ({engine.config.num_prompts} prompts, {engine.config.layout} layout) "
          f"on http://{a.host}:{a.port}/v1/chat/completions", flush=True)
    serve(engine, a.host, a.port, a.max_batch, a.max_queue, a.max_tokens, a.cache_mb)
