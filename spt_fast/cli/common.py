"""What the commands share: flags with their defaults read from the config dataclasses, the help
formatter, which flags a command line gave, checking an output path before any expensive work,
and the one way a command writes a JSON result."""
import argparse
import json
import os
from pathlib import Path

from ..data.corpora import FORMATS
from ..errors import SPTError
from ..model.cpu_projections import WEIGHTS
from ..training.trainer import TrainConfig
from ..utils import DTYPE_NAMES, write_text_atomic


def add_model_args(p, from_checkpoint: bool = False, bf16_default: bool = True) -> None:
    """--model/--dtype/--load-4bit. For a command that loads a checkpoint the defaults are what the
    checkpoint recorded; otherwise TrainConfig's."""
    t = TrainConfig()
    recorded = " (default: as recorded in the checkpoint)" if from_checkpoint else ""
    p.add_argument("--model", default=None if from_checkpoint else t.model,
                   help="base model: 'default' (embedded SmolLM2-135M-Instruct), a local Hugging Face folder, "
                        "or a .gguf file" + recorded)
    dtype_default = ""
    if from_checkpoint and bf16_default:
        dtype_default = " (default: bf16 on a CPU with native bf16 math, AVX-512 BF16 or AMX; else as recorded)"
    elif from_checkpoint:
        dtype_default = (" (default: bf16 on a CPU with native bf16 math where a token's numbers never depend on "
                         "the requests sharing its batch, the C step serving every batch size with dense weights; "
                         "else as recorded in the checkpoint)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None if from_checkpoint else t.dtype,
                   help="base model dtype" + dtype_default)
    p.add_argument("--load-4bit", action="store_true", default=None if from_checkpoint else t.load_4bit,
                   help="quantize the base model's linear layers to NF4 (bitsandbytes)" + recorded)
    if from_checkpoint:  # a generation command
        p.add_argument("--weights", choices=WEIGHTS, default=None,
                       help="CPU decode with weight-only int8 / int4 copies of the dense layers, or w8a8 (int8 "
                            "weights and activations: fastest without native bf16) (faster, replies may differ "
                            "slightly); default: full precision")


def add_compile_arg(p) -> None:
    """--compile auto|on|off for the commands that generate (chat, generate, eval)."""
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="the decode step: 'auto' on CPU runs the first call of each batch shape eagerly and "
                        "compiles the step before the second (chat: between turns; kept on disk: a later run "
                        "recompiles in seconds), "
                        "eager on GPU; 'on' compiles before the first step (CUDA graphs on GPU); 'off' eager. "
                        "SPT_FAST_COMPILE sets what auto means")


def add_data_args(p, default: str | None = "chitchat") -> None:
    p.add_argument("--data", default=default, required=default is None,
                   help="'chitchat' (the corpus of the chitchat-dataset package) or a ConvAI2 .txt / JSONL file")
    p.add_argument("--data-format", choices=FORMATS, default=None,
                   help="format of --data (default: from the file extension)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default once: not when its help already says it, not for on/off switches
    or defaults that are None (their help says what happens then)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def explicit_flags(add_arguments, argv: list[str]) -> set[str]:
    """The dests a command line set explicitly (its defaults do not count)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    # A namespace that already holds every dest gets no defaults: what changes was given.
    unset = object()
    namespace = argparse.Namespace(**{dest: unset for dest in vars(parser.parse_args([]))})
    got = parser.parse_known_args(argv, namespace=namespace)[0]
    return {dest for dest, value in vars(got).items() if value is not unset}


def check_writable(path, flag: str) -> None:
    """SPTError naming the flag when `path` (a file to be written) cannot be written: checked
    before the work whose result it is to hold."""
    if path is None:
        return
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_dir():
            raise IsADirectoryError(21, "is a directory")
        probe = p.parent / f".{p.name}.{os.getpid()}.tmp"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SPTError(f"{flag} {path}: cannot write ({e.strerror or e})") from None


def write_json(path, obj, flag: str = "--json") -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        raise SPTError(f"{flag} {path}: cannot write ({e.strerror or e})") from None
