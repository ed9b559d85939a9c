"""Export one soft prompt as a PEFT prompt-tuning adapter (adapter_config.json + safetensors)."""
import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from . import checkpoint
from .errors import SPTError


def export_peft(ckpt: str, prompt_index: int, output_dir: str) -> Path:
    tensors, config, folder = checkpoint.load(ckpt)
    prompts = tensors["prompts"]
    K, L, d = prompts.shape
    if not 0 <= prompt_index < K:
        raise SPTError(f"--prompt-index must be in 0..{K - 1} (the checkpoint has K={K}), got {prompt_index}")
    spt = config.get("spt", {})
    if spt.get("layout", "prefix") != "prefix":
        # PEFT always puts virtual tokens first; a shared-layout prompt was trained after the context.
        print(f"warning: {folder} was trained with layout '{spt.get('layout')}'; PEFT places the prompt "
              "first (prefix layout), so replies may differ", flush=True)
    adapter_config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": L,
        "token_dim": d,
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "base_model_name_or_path": config.get("model"),
        "inference_mode": True,
        "revision": None,
    }
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {"prompt_embeddings": prompts[prompt_index].contiguous()}
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=out)
    os.close(fd)
    save_file(weights, tmp)
    os.replace(tmp, out / "adapter_model.safetensors")
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=out)
    with os.fdopen(fd, "w") as f:
        json.dump(adapter_config, f, indent=2)
    os.replace(tmp, out / "adapter_config.json")
    return out
