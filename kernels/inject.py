"""Batched prompt injection: scatter the selected (or all K) soft prompts into the input
embedding buffer at each row's prompt position, no Python loop over rows."""
import torch

from ._dispatch import use_triton


def inject_prompts_ref(token_embeds, prompts, row_src, prompt_idx, prompt_pos):
    """out[n] = tok[row_src[n], :pos] ++ prompts[prompt_idx[n]] ++ tok[row_src[n], pos:]."""
    B, T, d = token_embeds.shape
    L = prompts.shape[1]
    N = row_src.shape[0]
    dev = token_embeds.device
    j = torch.arange(T + L, device=dev)[None, :]  # output slot
    pos = prompt_pos.to(dev)[:, None]
    in_prompt = (j >= pos) & (j < pos + L)
    tok_j = torch.where(j < pos, j, j - L).clamp(0, T - 1)  # source token slot outside the prompt
    toks = token_embeds[row_src.to(dev)[:, None], tok_j]  # [N, T+L, d]
    pr = prompts.to(token_embeds.dtype)[prompt_idx.to(dev)[:, None], (j - pos).clamp(0, L - 1)]
    return torch.where(in_prompt[:, :, None], pr, toks)


def inject_prompts(token_embeds, prompts, row_src, prompt_idx, prompt_pos):
    if use_triton(token_embeds, prompts):
        from .inject_triton import inject_prompts_triton

        return inject_prompts_triton(token_embeds, prompts, row_src, prompt_idx, prompt_pos)
    return inject_prompts_ref(token_embeds, prompts, row_src, prompt_idx, prompt_pos)
