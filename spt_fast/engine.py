"""Which implementation runs SPT for a given base model and layout.

- prefix (any HF causal LM): `SPTModel`, one batched K·B forward of `[P_k][context][response]`.
- shared (Llama architecture): `SharedSPTModel`, the context once under no_grad, then K·B short
  branches `[P_k][response]` that attend to the context KV through the branch-attention kernel.
"""
import warnings

import torch

from .errors import ModelLoadError
from .kernels.inject import inject_prompts
from .llama import Llama, LlamaConfig
from .spt import SPTConfig, SPTModel


def fast_path_problem(base) -> str | None:
    """Why the shared-context engine cannot run this model, or None when it can."""
    try:
        LlamaConfig.from_hf(base.config)
    except ModelLoadError as exc:
        return str(exc)
    if not hasattr(base, "model") or not hasattr(base, "lm_head"):
        return f"{type(base).__name__} is not a LlamaForCausalLM"
    return None


def resolve_layout(layout: str, base) -> str:
    """'auto' -> 'shared' where the fast engine supports the model, else 'prefix' with a warning."""
    if layout != "auto":
        return layout
    problem = fast_path_problem(base)
    if problem is None:
        return "shared"
    warnings.warn(f"the shared-context fast path does not support this model ({problem}); "
                  "falling back to the prefix layout", stacklevel=2)
    return "prefix"


class SharedSPTModel(SPTModel):
    """SPT in the shared layout `[context][P_k][response]` on the compact Llama forward."""

    def __init__(self, base, config: SPTConfig, tokenizer=None):
        super().__init__(base, config, tokenizer)
        # Shares the HF model's modules: generation keeps using the HF model, training this view.
        self.fast = Llama.from_hf_modules(base)

    def _response_hidden(self, batch, embeds, prompt_idx):
        B = batch.input_ids.shape[0]
        N = prompt_idx.shape[0]
        L = self.config.prompt_len
        R = batch.targets.shape[1]
        dev = embeds.device
        ctx_len = batch.ctx_len.to(dev)
        tc = int(ctx_len.max())
        ctx = self.fast.context_pass(embeds[:, :tc], ctx_len)
        # Branch inputs: the prompt, then every response token but the last (which is only a target).
        t = torch.arange(R - 1, device=dev)
        where = (ctx_len[:, None] + t[None, :]).clamp_max(embeds.shape[1] - 1)
        resp = torch.gather(embeds, 1, where[:, :, None].expand(B, R - 1, embeds.shape[2]))
        row_src = torch.arange(N, device=dev) % B
        rows = inject_prompts(resp, self.prompts.weight.to(embeds.dtype), row_src, prompt_idx,
                              torch.zeros(N, dtype=torch.long, device=dev))
        hidden = self.fast.branch_pass(rows, ctx, row_src)  # [N, L+R-1, d]
        # Target t is predicted by branch position L-1+t.
        return hidden[:, L - 1 : L - 1 + R].reshape(N // B, B, R, hidden.shape[-1])


def build_spt_model(base, config: SPTConfig, tokenizer=None) -> SPTModel:
    config.layout = resolve_layout(config.layout, base)
    if config.layout == "shared":
        problem = fast_path_problem(base)
        if problem is not None:
            raise ModelLoadError(f"--layout shared needs a Llama-architecture model: {problem}")
        return SharedSPTModel(base, config, tokenizer)
    return SPTModel(base, config, tokenizer)
