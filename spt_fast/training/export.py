"""Export one soft prompt as a PEFT prompt-tuning adapter (adapter_config.json + safetensors)."""
import json
from pathlib import Path

from ..errors import SPTError
from ..model.loading import DEFAULT_HUB_NAME
from ..utils import save_tensors_atomic, write_text_atomic
from . import checkpoint


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
        # The checkpoint names the embedded default 'default'; PEFT users know it by its hub name.
        "base_model_name_or_path": DEFAULT_HUB_NAME if config.get("model") in (None, "default") else config["model"],
        "inference_mode": True,
        "revision": None,
    }
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(out / "adapter_model.safetensors", {"prompt_embeddings": prompts[prompt_index]})
    write_text_atomic(out / "adapter_config.json", json.dumps(adapter_config, indent=2))
    return out
