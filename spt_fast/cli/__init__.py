"""The `spt-fast` command. One module per command, each holding its parser and its run():
train, eval (evaluate), generate, chat, export, demo, study, bench."""
import argparse
import os
import sys

from ..errors import SPTError
from . import bench, chat, demo, evaluate, export, generate, study, train

COMMANDS = {"train": train, "eval": evaluate, "generate": generate, "chat": chat, "export": export,
            "demo": demo, "study": study, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spt-fast", description="Selective Prompt Tuning (SPT), fast.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return ap


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.cmd].run(args)
    except SPTError as exc:
        print(f"spt-fast {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
