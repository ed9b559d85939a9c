"""Token selection and stop detection that stay on the device during decoding.

- `GenConfig`: the knobs of one generation call (greedy / temperature + top-p, seed, stops, bound).
- `sample_next`: greedy arg-max, or an exact categorical sample drawn as arg-max(p / E) with
  E ~ Exp(1) noise made outside (so a compiled step holds no RNG and a seed reproduces it).
- `StopTable`: the stop strings compiled into a token-level automaton, [states, vocab] -> state.
  Each row carries its state (the longest tail of its text that starts a stop string) on the
  device, so detecting `\\n`, `Q:`, `R:` costs one gather per step and no decode on the host.
- `advance`: one step of all of that for a batch, returning which rows are finished.
- `TextDelta`: turns a growing decoded text into the stream of pieces a user may already see.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .errors import SPTError
from .metrics import STOP_STRINGS, cut_reply


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
        if isinstance(self.stops, str):
            self.stops = (self.stops,)
        self.stops = tuple(s for s in self.stops if s)  # an empty stop would cut everything
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
        known = set(cls.__dataclass_fields__) - {"extra"}
        extra = {k: v for k, v in kw.items() if k not in known}
        cfg = replace(base or cls(), **{k: v for k, v in kw.items() if k in known})
        cfg.extra = extra
        return cfg


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, noise: torch.Tensor | None):
    """Next token [B] from fp32 logits [B, V]; noise [B, V] ~ Exp(1), or None for greedy."""
    if noise is None:
        return logits.argmax(-1)
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


class StopTable:
    """Stop strings as an automaton over token ids: next_state = table[state, token].

    States are the distinct proper prefixes of the stop strings ('' = state 0); `STOP` (= the
    number of states) means a stop string has appeared. A match is found in text that spans any
    number of tokens, as long as decoding is concatenative (byte-level BPE and SentencePiece are,
    for the ASCII stop strings used here): a stop split over tokens always passes through the
    state of its prefix.
    """

    def __init__(self, pieces: list[str], stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        prefixes = sorted({s[:i] for s in self.stops for i in range(1, len(s))}, key=lambda p: (len(p), p))
        self.states = [""] + prefixes
        self.STOP = len(self.states)
        index = {p: i for i, p in enumerate(self.states)}
        alphabet = set("".join(self.stops))
        table = torch.zeros(len(self.states), len(pieces), dtype=torch.long)
        for v, piece in enumerate(pieces):
            if not piece:
                table[:, v] = torch.arange(len(self.states))  # skipped special token: state unchanged
                continue
            if not alphabet.intersection(piece):
                continue  # no stop can end in this piece, nor can a stop prefix: back to state 0
            for s, prefix in enumerate(self.states):
                text = prefix + piece
                if any(stop in text for stop in self.stops):
                    table[s, v] = self.STOP
                    continue
                for n in range(min(len(text), max(len(p) for p in self.states)), 0, -1):
                    if text[-n:] in index:
                        table[s, v] = index[text[-n:]]
                        break
        # STOP is absorbing (the row is finished anyway; keeps the gather in range).
        self.table = torch.cat([table, torch.full((1, len(pieces)), self.STOP, dtype=torch.long)])

    @classmethod
    def for_tokenizer(cls, tokenizer, stops, vocab_size: int | None = None) -> "StopTable":
        return cls(token_pieces(tokenizer, vocab_size), tuple(stops))

    def to(self, device) -> "StopTable":
        self.table = self.table.to(device)
        return self


def token_pieces(tokenizer, vocab_size: int | None = None) -> list[str]:
    """The text each token id adds when decoded after other text (special tokens: '').

    Decoding one token alone drops SentencePiece's leading space, so each id is decoded after an
    anchor token and the anchor's own text is removed.
    """
    n = max(vocab_size or 0, len(tokenizer))
    anchor_ids = tokenizer.encode("a", add_special_tokens=False)[:1]
    anchor = tokenizer.decode(anchor_ids, skip_special_tokens=True) if anchor_ids else ""
    ids = range(n)
    # Ids past the tokenizer's vocabulary (padded embedding rows) decode to nothing.
    real = [v if v < len(tokenizer) else None for v in ids]
    pairs = [anchor_ids + [v] for v in real if v is not None]
    decoded = iter(tokenizer.batch_decode(pairs, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    pieces = []
    for v in real:
        if v is None:
            pieces.append("")
            continue
        text = next(decoded)
        if anchor and text.startswith(anchor):
            pieces.append(text[len(anchor):])
        else:
            pieces.append(tokenizer.decode([v], skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return pieces


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


class TextDelta:
    """Pieces of a reply safe to show while it grows: their concatenation is the final reply.

    Held back: anything after a stop string, a tail that could still become a stop string, trailing
    whitespace and an incomplete UTF-8 character, and leading whitespace (the reply is stripped).
    """

    def __init__(self, stops):
        self.stops = tuple(s for s in stops if s)
        self.shown = ""

    def _visible(self, text: str) -> str:
        text = cut_reply(text, self.stops) if self.stops else text.strip()
        for stop in self.stops:  # a tail that may be the start of a stop string
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    text = text[:-n]
                    break
        return text.rstrip().rstrip("\ufffd").rstrip()

    def update(self, text: str) -> str:
        visible = self._visible(text)
        if len(visible) <= len(self.shown) or not visible.startswith(self.shown):
            return ""
        delta, self.shown = visible[len(self.shown):], visible
        return delta

    def finish(self, final: str) -> str:
        if not final.startswith(self.shown):  # never happens with a concatenative decoder
            return ""
        delta, self.shown = final[len(self.shown):], final
        return delta
