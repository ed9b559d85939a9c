"""Batched greedy generation on the generic Hugging Face path, one prompt per row.

Every row gets its own retrieved prompt, placed first (prefix layout) or after its context
(shared layout); the rows are left-aligned into one batch and decoded together with the model's
KV cache, so a batch costs one decode loop whatever mix of prompts it holds.
"""
import inspect

import torch

from .metrics import STOP_STRINGS, cut_reply
from .kernels.inject import inject_prompts
from .spt import Batch, SPTModel, collate


def _cache_kw(model) -> str:
    # transformers renamed `past_key_values` to `cache` in 5.2x; accept both.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    return out.get("cache", None) if "cache" in out else out.get("past_key_values", None)


def left_align(rows: torch.Tensor, lengths: torch.Tensor):
    """Right-padded [B,S,d] rows -> left-padded rows, attention mask and position ids."""
    B, S = rows.shape[:2]
    shift = S - lengths  # [B]
    src = torch.arange(S, device=rows.device)[None, :] - shift[:, None]  # [B,S]
    mask = src >= 0
    src = src.clamp_min(0)
    aligned = torch.gather(rows, 1, src[:, :, None].expand(B, S, rows.shape[2]))
    aligned = aligned * mask[:, :, None].to(aligned.dtype)
    return aligned, mask.long(), src


def _stopped(text: str, stops) -> bool:
    return any(s in text for s in stops)


@torch.no_grad()
def generate_batch(model: SPTModel, tokenizer, batch: Batch, max_new_tokens: int = 32,
                   stops=STOP_STRINGS, prompt_idx: torch.Tensor | None = None, noise: float = 0.0,
                   generator=None) -> tuple[list[str], list[int]]:
    """Greedy replies for a batch of contexts (batch built with empty responses)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    base = model.base
    device = model.device
    batch = batch.to(device)
    B = batch.input_ids.shape[0]
    if prompt_idx is None:
        prompt_idx = model.select(batch, noise=noise, generator=generator)
    embeds = model.embed(batch.input_ids)
    row_src = torch.arange(B, device=device)
    pos = torch.zeros(B, dtype=torch.long, device=device) if model.config.layout == "prefix" else batch.ctx_len
    rows = inject_prompts(embeds, model.prompts.weight.to(embeds.dtype), row_src, prompt_idx.to(device), pos)
    lengths = batch.ctx_len + model.config.prompt_len
    rows = rows[:, : int(lengths.max())]
    rows, mask, positions = left_align(rows, lengths)
    cache_kw = _cache_kw(base)
    out = base(inputs_embeds=rows, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = _cache_of(out)
    next_pos = lengths.clone()
    eos = tokenizer.eos_token_id
    generated = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    logits = out.logits[:, -1]
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        for b in range(B):
            if done[b]:
                continue
            t = int(token[b])
            if t == eos:
                done[b] = True
                continue
            generated[b].append(t)
            if _stopped(tokenizer.decode(generated[b], skip_special_tokens=True), stops):
                done[b] = True
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        out = base(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                   use_cache=True, **{cache_kw: cache})
        cache = _cache_of(out)
        next_pos = next_pos + 1
        logits = out.logits[:, -1]
    texts = [cut_reply(tokenizer.decode(g, skip_special_tokens=True), stops) for g in generated]
    return texts, prompt_idx.tolist()


def generate(model: SPTModel, tokenizer, encoded: list, batch_size: int = 16, max_new_tokens: int = 32,
             stops=STOP_STRINGS, noise: float = 0.0, seed: int = 0, progress: bool = False):
    """Replies and chosen prompt indices for a list of Encoded contexts, in order."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    texts, picks = [], []
    model.eval()
    chunks = range(0, len(encoded), batch_size)
    for start in tqdm(chunks, desc="generate", disable=not progress):
        part = encoded[start : start + batch_size]
        batch = collate(part, tokenizer.pad_token_id, tokenizer.bos_token_id)
        t, p = generate_batch(model, tokenizer, batch, max_new_tokens, stops, noise=noise, generator=gen)
        texts += t
        picks += p
    return texts, picks
