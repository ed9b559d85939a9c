"""`spt-fast export`: one soft prompt as a PEFT prompt-tuning adapter."""

from ..training.export import export_peft
from .common import HelpFormatter


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export one soft prompt as a PEFT prompt-tuning adapter",
                       formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt-index", type=int, default=0, help="which of the K prompts")
    p.add_argument("--output", required=True, help="folder for adapter_config.json + adapter_model.safetensors")


def run(a) -> None:
    out = export_peft(a.checkpoint, a.prompt_index, a.output)
    print(f"wrote PEFT prompt-tuning adapter to {out}")
