"""The test oracle: plain greedy generation on the Hugging Face forward, one prompt per row.

Written the obvious way (the model's own forward and cache, a decode of the text after every
token to look for stops) so that the engine (generation.engine) can be checked against it token
for token. Every row gets its own retrieved prompt, placed by the layout's rule; the rows are
left-aligned into one batch and decoded together. Nothing that reports a metric or serves a reply
uses this path.
"""
import torch

from ..data.batch import Batch
from ..kernels.inject import inject_prompts
from ..model.spt import SPTModel
from .backends import cache_kwarg, cache_of, left_align
from .stops import STOP_STRINGS, cut_reply


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
    pos = model.prompt_positions(batch.ctx_len, batch.tag_len)
    rows = inject_prompts(embeds, model.prompts.weight.to(embeds.dtype), row_src, prompt_idx.to(device), pos)
    lengths = batch.ctx_len + model.config.prompt_len
    rows = rows[:, : int(lengths.max())]
    rows, mask, positions = left_align(rows, lengths)
    cache_kw = cache_kwarg(base)
    out = base(inputs_embeds=rows, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = cache_of(out)
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
        cache = cache_of(out)
        next_pos = next_pos + 1
        logits = out.logits[:, -1]
    texts = [cut_reply(tokenizer.decode(g, skip_special_tokens=True), stops) for g in generated]
    return texts, prompt_idx.tolist()
