"""`spt-fast chat`: talk to a trained SPT checkpoint in the terminal.

Set a persona, then type messages; each reply streams as it is decoded and is labelled with the
soft prompt the retriever chose for that turn. The whole conversation is the history of the next
turn (its oldest turns are dropped once it outgrows the context budget).
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import SPTError
from ..generation.decoding import GenConfig
from .common import HelpFormatter, add_compile_arg, add_model_args

HELP = """commands:
  /persona             show the persona
  /persona A | B | C   set the persona (sentences separated by |); '/persona -' clears it
  /reset               forget the conversation (the persona stays)
  /history             show the conversation so far
  /prompt K            always use soft prompt K; '/prompt auto' lets the retriever choose again
  /help                this help
  /quit                leave (end of input also leaves)
anything else is your next message"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    g = GenConfig()
    c = subparsers.add_parser("chat", help="chat with a trained checkpoint in the terminal (shows the chosen prompt)",
                              formatter_class=HelpFormatter)
    c.add_argument("--checkpoint", required=True, help="a checkpoint folder or a training output folder")
    add_model_args(c, from_checkpoint=True)
    c.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    c.add_argument("--persona", action="append", default=[], help="a persona sentence (repeat for more)")
    c.add_argument("--max-new-tokens", type=int, default=g.max_new_tokens)
    c.add_argument("--temperature", type=float, default=g.temperature, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=g.top_p)
    c.add_argument("--seed", type=int, default=g.seed, help="sampling seed (turn t uses seed + t)")
    c.add_argument("--selection-noise", type=float, default=g.selection_noise,
                   help="std of Gaussian noise on retriever scores")
    add_compile_arg(c)
    return c


def _split_persona(text: str) -> list[str]:
    return [] if text.strip() == "-" else [p.strip() for p in text.split("|") if p.strip()]


def run(args, stdin=None, stdout=None, engine=None) -> None:
    """The chat loop; reads stdin until /quit or end of input. `engine` skips loading (tests)."""
    from ..generation.engine import Engine

    inp = stdin or sys.stdin
    out = stdout or sys.stdout
    own = engine is None
    if engine is None:
        engine = Engine.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype,
                                        compile=args.compile, model=args.model, load_4bit=args.load_4bit,
                                        weights=args.weights)
    K = engine.config.num_prompts
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
               selection_noise=args.selection_noise)
    engine.options(**gen)  # bad options fail now, not at the first message
    persona = [p for p in args.persona if p.strip()]

    def say(text=""):
        out.write(text + "\n")
        out.flush()

    path = "fast engine" if engine.fast else "Hugging Face fallback path"
    say(f"spt-fast chat: {K} soft prompt(s), {engine.config.layout} layout, {path}. /help for commands.")
    say(f"persona: {' '.join(persona) if persona else '(none)'}")
    try:
        _converse(engine, args, inp, out, say, persona, gen, K)
    except KeyboardInterrupt:
        _leave(engine, own, out, 130)
        raise
    _leave(engine, own, out, 0)


def _leave(engine, own: bool, out, code: int) -> None:
    """Ending while a compile runs in its second thread: exit at once (output flushed). Python's
    own shutdown aborted there ("terminate called without an active exception", status 134) inside
    the compiler's native threads. What inductor had written to its disk cache stays. Only for an
    engine this command made itself (tests pass theirs and keep their process)."""
    if own and getattr(engine.backend, "compiling", False):
        out.flush()
        sys.stderr.flush()
        os._exit(code)


def _converse(engine, args, inp, out, say, persona, gen, K) -> None:
    forced = None
    history: list[str] = []
    turn = 0
    while True:
        out.write("you> ")
        out.flush()
        line = inp.readline()
        if not line:
            say()
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            rest = rest.strip()
            if cmd in ("/quit", "/exit"):
                return
            if cmd == "/help":
                say(HELP)
            elif cmd == "/persona":
                if rest:
                    persona = _split_persona(rest)
                say(f"persona: {' | '.join(persona) if persona else '(none)'}")
            elif cmd == "/reset":
                history = []
                say("(conversation cleared)")
            elif cmd == "/history":
                for i, utt in enumerate(history):
                    say(f"  {'you' if i % 2 == 0 else 'bot'}: {utt}")
                if not history:
                    say("  (empty)")
            elif cmd == "/prompt":
                if rest == "auto":
                    forced = None
                    say("(the retriever chooses the prompt)")
                elif rest.isdigit() and int(rest) < K:
                    forced = int(rest)
                    say(f"(always prompt {forced})")
                else:
                    say(f"usage: /prompt K (0..{K - 1}) or /prompt auto")
            else:
                say(f"unknown command {cmd}; /help lists them")
            continue

        history.append(line)
        seed = None if args.seed is None else args.seed + turn
        if getattr(engine.backend, "compiling", False):
            say("(compiling the decode step for this machine: once, then kept on disk)")
        try:
            pieces = engine.stream(persona, history, prompt=forced, seed=seed, **gen)
            first = next(pieces, None)  # retrieval has run: the chosen prompt is known
            out.write(f"bot [prompt {engine.last_prompts[0]}]> {first or ''}")
            out.flush()
            for piece in pieces:
                out.write(piece)
                out.flush()
        except SPTError as exc:
            history.pop()
            say(f"error: {exc}")
            continue
        say()
        engine.compile_pending()  # while the user reads and types
        history.append(engine.last_replies[0].text)
        turn += 1
