"""The `spt-fast` command. One module per command, each holding its parser and its run():
train, eval (evaluate), generate, chat, serve, export, demo, study, bench."""
import argparse
import os
import sys

from ..errors import SPTError
from ..training.trainer import TrainingInterrupted
from . import bench, chat, demo, evaluate, export, generate, serve, study, train

COMMANDS = {"train": train, "eval": evaluate, "generate": generate, "chat": chat, "serve": serve, "export": export,
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
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv, start=1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 reach Python as lone surrogates
            shown = arg.encode("utf-8", "replace").decode("utf-8")
            flag = f", the value of {argv[i - 2]}" if i > 1 and argv[i - 2].startswith("-") else ""
            print(f"spt-fast: error: argument {i} ({shown!r}{flag}) is not valid UTF-8", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        COMMANDS[args.cmd].run(args)
    except TrainingInterrupted as exc:
        print(f"spt-fast {args.cmd}: interrupted: {exc}", file=sys.stderr)
        return 130
    except SPTError as exc:
        print(f"spt-fast {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
