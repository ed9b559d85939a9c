"""Which implementation runs SPT for a given base model and layout.

- layouts that put the prompt first (prefix), on any HF causal LM: `SPTModel`, one batched K·B
  forward of the whole sequences.
- layouts that share the context (shared), on a Llama architecture: `SharedSPTModel`, the shared
  context once under no_grad, then K·B short branches through the branch-attention kernel.
"""
import warnings

from ..errors import ModelLoadError
from .layouts import AUTO, get_layout
from .llama import LlamaConfig
from .shared import SharedSPTModel
from .spt import SPTConfig, SPTModel


def fast_path_problem(base) -> str | None:
    """Why the compact Llama forward cannot run this model, or None when it can."""
    try:
        LlamaConfig.from_hf(base.config)
    except ModelLoadError as exc:
        return str(exc)
    if not hasattr(base, "model") or not hasattr(base, "lm_head"):
        return f"{type(base).__name__} is not a LlamaForCausalLM"
    return None


def resolve_layout(layout: str, base) -> str:
    """'auto' -> 'shared' where the fast engine supports the model, else 'prefix' with a warning."""
    if layout != AUTO:
        return layout
    problem = fast_path_problem(base)
    if problem is None:
        return "shared"
    warnings.warn(f"the shared-context fast path does not support this model ({problem}); "
                  "falling back to the prefix layout", stacklevel=2)
    return "prefix"


def build_spt_model(base, config: SPTConfig, tokenizer=None) -> SPTModel:
    """The SPT model for `config` on `base`; its `.config` has the layout resolved ('auto' never
    stays), and `config` itself is left as it was."""
    config = config.replace(layout=resolve_layout(config.layout, base))
    if get_layout(config.layout).shares_context:
        problem = fast_path_problem(base)
        if problem is not None:
            raise ModelLoadError(f"--layout {config.layout} needs a Llama-architecture model: {problem}")
        return SharedSPTModel(base, config, tokenizer)
    return SPTModel(base, config, tokenizer)
