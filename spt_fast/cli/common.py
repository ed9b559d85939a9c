"""Flags several commands share, with their defaults read from the config dataclasses, and the
one way a command writes a JSON result."""
import json
from pathlib import Path

from ..data.corpora import FORMATS
from ..errors import SPTError
from ..training.trainer import TrainConfig
from ..utils import DTYPE_NAMES, write_text_atomic


def add_model_args(p, from_checkpoint: bool = False) -> None:
    """--model/--dtype/--load-4bit. For a command that loads a checkpoint the defaults are what the
    checkpoint recorded; otherwise TrainConfig's."""
    t = TrainConfig()
    recorded = " (default: as recorded in the checkpoint)" if from_checkpoint else ""
    p.add_argument("--model", default=None if from_checkpoint else t.model,
                   help="base model: 'default' (embedded SmolLM2-135M-Instruct), a local Hugging Face folder, "
                        "or a .gguf file" + recorded)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None if from_checkpoint else t.dtype,
                   help="base model dtype" + recorded)
    p.add_argument("--load-4bit", action="store_true", default=None if from_checkpoint else t.load_4bit,
                   help="quantize the base model's linear layers to NF4 (bitsandbytes)" + recorded)


def add_data_args(p, default: str | None = "chitchat") -> None:
    p.add_argument("--data", default=default, required=default is None,
                   help="'chitchat' (the corpus of the chitchat-dataset package) or a ConvAI2 .txt / JSONL file")
    p.add_argument("--data-format", choices=FORMATS, default=None,
                   help="format of --data (default: from the file extension)")


def write_json(path, obj, flag: str = "--json") -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        raise SPTError(f"{flag} {path}: cannot write ({e.strerror or e})") from None
