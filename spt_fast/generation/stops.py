"""Stop strings: where a reply ends, on the host and on the device.

The LM continues past its own turn; the reply ends where it starts a new line or a new speaker
(`STOP_STRINGS`). `cut_reply` applies that to text; `StopTable` compiles the stop strings into a
token-level automaton, [states, vocab] -> state, so each decoding row carries its state (the
longest tail of its text that starts a stop string) on the device and detecting a stop costs one
gather per step and no decode on the host; `TextDelta` turns a growing reply into the pieces a
stream may already show.
"""
from __future__ import annotations

import re

import torch

STOP_STRINGS = ("\n", "Q:", "R:")
# The authors' evaluation cuts a reply at a newline or at any ':' (which covers Q:, R:, Summary:).
PAPER_STOP_STRINGS = ("\n", ":")


def cut_reply(text: str, stops=STOP_STRINGS) -> str:
    """Keep the text before the earliest stop string, stripped of surrounding whitespace."""
    end = len(text)
    for stop in stops:
        if not stop:
            continue  # an empty stop would cut everything
        at = text.find(stop)
        if 0 <= at < end:
            end = at
    return text[:end].strip()


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
        self.STOP = S = len(self.states)
        index = {p: i for i, p in enumerate(self.states)}
        longest = max(map(len, self.states))
        alphabet = set("".join(self.stops))
        # A stop that starts in the state's text and ends in the piece: the state ends with its head,
        # the piece starts with its tail. (Built per stop set at run time, e.g. a request's `stop`:
        # per piece a few C-level string tests, not a walk over every state; ~0.1 s for 49k pieces.)
        crossing = [(stop[i:], [k for k, p in enumerate(self.states) if p.endswith(stop[:i])])
                    for stop in self.stops for i in range(1, len(stop))]
        crossing = [(tail, ks) for tail, ks in crossing if ks]
        tails = tuple(tail for tail, _ in crossing)
        ends = {p[-1] for p in self.states if p}  # a piece ending elsewhere leaves state 0
        # A short piece's new state reaches back into the state's text only if a longer state ends
        # with the whole piece: those pieces are the proper tails of the states.
        reaching = {q[-j:] for q in self.states for j in range(1, len(q))}
        inside = re.compile("|".join(map(re.escape, self.stops))) if self.stops else None
        stopped = [k for k, p in enumerate(self.states) if any(stop in p for stop in self.stops)]  # unreachable

        def last_state(text: str) -> int:  # the longest tail of the text that starts a stop string
            for n in range(min(len(text), longest), 0, -1):
                k = index.get(text[-n:])
                if k is not None:
                    return k
            return 0

        rows = [[0] * len(pieces) for _ in range(S)]
        for v, piece in enumerate(pieces):
            if not piece:
                for k in range(S):
                    rows[k][v] = k  # skipped special token: state unchanged
                continue
            if not alphabet.intersection(piece):
                continue  # no stop can end in this piece, nor can a stop prefix: back to state 0
            if inside.search(piece):
                for k in range(S):
                    rows[k][v] = S
                continue
            if len(piece) >= longest or piece not in reaching:  # the new state lies within the piece
                k_end = last_state(piece) if piece[-1] in ends else 0
                if k_end:
                    for k in range(S):
                        rows[k][v] = k_end
            else:
                for k in range(S):
                    rows[k][v] = last_state(self.states[k] + piece)
            if tails and piece.startswith(tails):
                for tail, ks in crossing:
                    if piece.startswith(tail):
                        for k in ks:
                            rows[k][v] = S
            for k in stopped:
                rows[k][v] = S
        # STOP is absorbing (the row is finished anyway; keeps the gather in range).
        self.table = torch.tensor(rows + [[S] * len(pieces)], dtype=torch.long)

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
