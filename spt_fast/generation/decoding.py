"""Token selection that stays on the device during decoding.

- `GenConfig`: the knobs of one generation call (greedy / temperature + top-p, seed, stops, bound).
- `sample_next`: greedy arg-max, or an exact categorical sample drawn as arg-max(p / E) with
  E ~ Exp(1) noise made outside (so a compiled step holds no RNG and a seed reproduces it).
- `advance`: one step for a batch (token choice, eos, the stop automaton of generation.stops),
  returning which rows are finished; `row_tokens` reads a row's result back on the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..errors import SPTError
from ..model.cpu_native import argmax_rows
from .stops import STOP_STRINGS


@dataclass
class GenConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling mass (sampling only)
    seed: int | None = None  # sampling and selection-noise seed; None: a fresh random one
    stops: tuple[str, ...] = STOP_STRINGS
    selection_noise: float = 0.0  # std of Gaussian noise on the retriever scores
    prompt: int | list[int] | None = None  # force this soft prompt (or one per row) instead of retrieving
    ignore_eos: bool = False  # run exactly max_new_tokens (benchmarks)
    check_every: int | None = None  # steps between host syncs (early exit); None: 1 on CPU, 8 on GPU
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self, num_prompts: int | None = None) -> "GenConfig":
        """Raises SPTError naming the first bad option; changes nothing."""
        if not isinstance(self.stops, tuple) or not all(isinstance(s, str) and s for s in self.stops):
            raise SPTError(f"stops must be a tuple of non-empty strings, got {self.stops!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SPTError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise SPTError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise SPTError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.selection_noise >= 0:
            raise SPTError(f"selection_noise must be >= 0, got {self.selection_noise!r}")
        if self.check_every is not None and self.check_every < 1:
            raise SPTError(f"check_every must be >= 1, got {self.check_every!r}")
        if self.prompt is not None and num_prompts is not None:
            picks = self.prompt if isinstance(self.prompt, (list, tuple)) else [self.prompt]
            if not all(isinstance(p, int) and 0 <= p < num_prompts for p in picks):
                raise SPTError(f"prompt must be an index in 0..{num_prompts - 1} (the checkpoint has "
                               f"K={num_prompts}) or one per conversation, got {self.prompt!r}")
        if self.extra:
            raise SPTError(f"unknown generation option(s): {', '.join(sorted(self.extra))}")
        return self

    @classmethod
    def build(cls, base: "GenConfig | None" = None, **kw) -> "GenConfig":
        """A new config: `base` (or the defaults) with the keyword options applied. A single stop
        string becomes a tuple and empty stops are dropped (an empty stop would cut everything)."""
        known = set(cls.__dataclass_fields__) - {"extra"}
        chosen = {k: v for k, v in kw.items() if k in known}
        stops = chosen.get("stops")
        if isinstance(stops, str):
            chosen["stops"] = (stops,)
        elif isinstance(stops, (list, tuple)):
            chosen["stops"] = tuple(s for s in stops if s)
        return replace(base or cls(), **chosen, extra={k: v for k, v in kw.items() if k not in known})


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, noise: torch.Tensor | None):
    """Next token [B] from fp32 logits [B, V]; noise [B, V] ~ Exp(1), or None for greedy."""
    if noise is None:
        return argmax_rows(logits)  # (torch.argmax for anything it does not take)
    logits = logits / temperature
    if top_p < 1.0:
        # Stable sort: among equal logits the lower id comes first, as arg-max picks it.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        # The nucleus: the smallest head of the ranking whose mass reaches top_p (a token goes once
        # the tokens ranked above it already hold top_p); the first token always stays.
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # Exponential race: arg-max p_i / E_i is distributed as Categorical(p).
    return (logits.softmax(-1) / noise).argmax(-1)


def advance(logits, done, state, eos_id: int, temperature: float, top_p: float, noise, stop_table,
            ignore_eos: bool):
    """One decoding step for a batch, all on the device.

    Returns (token [B]: the sampled ids, fed back as the next input; emitted [B]: the same ids, or
    -1 for rows that had already finished; done [B] after this token; state [B]).
    A row finishes on eos (not emitted as text) or when its text now holds a stop string (the
    token that completed it is emitted; the final cut removes the stop).
    """
    token = sample_next(logits, temperature, top_p, noise)
    emitted = torch.where(done, torch.full_like(token, -1), token)
    new_done = done
    if not ignore_eos:
        new_done = new_done | (token == eos_id)
    if stop_table is not None:
        state = stop_table[state, token]
        new_done = new_done | (state == stop_table.shape[0] - 1)
    return token, emitted, new_done, state


def row_tokens(emitted: list[int], eos_id: int, ignore_eos: bool) -> tuple[list[int], str]:
    """A row's generated ids (up to its finish, eos dropped) and why it finished: eos/length/other."""
    out = []
    for t in emitted:
        if t < 0:
            return out, "stop"
        if t == eos_id and not ignore_eos:
            return out, "eos"
        out.append(t)
    return out, "length"


