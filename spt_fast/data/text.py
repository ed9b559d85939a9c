"""The paper's prompt text and its tokenisation into (context, response) ids with truncation.

Context: `given persona: {persona}; context: Q: {turn} R: {turn} ... R:`, target: ` {response}{eos}`.
The single space between the final `R:` and the response belongs to the response, so the joined
text is exactly the paper's while BPE tokenizers see the natural " word" token at the boundary.
"""
import warnings
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..errors import DataError, SPTError

# Tokenised pieces are cached because an utterance reappears in the history of every later sample
# of its dialogue. Samples of a dialogue are consecutive, so a small cache that is simply emptied
# when full keeps nearly all hits while bounding memory on 100k-sample corpora.
_CACHE_LIMIT = 50_000
_PROGRESS_MIN = 2000
# encode_all tokenises the new pieces of this many samples in one batched tokenizer call: the
# per-call Python overhead of a Hugging Face tokenizer is larger than the tokenising itself.
_CHUNK = 1024
# A word that pieces starting with a space are tokenised behind (see Encoder._encode_pieces).
_ANCHOR = "a"


def persona_text(persona) -> str:
    return " ".join(persona)


def turn_labels(n_history: int) -> list[str]:
    """Q/R label of each history utterance, counted from the end so history[-1] is always Q."""
    return ["Q" if (n_history - 1 - i) % 2 == 0 else "R" for i in range(n_history)]


# The final speaker tag: the reply follows it. Its token length comes from the tokenizer in use.
REPLY_TAG = " R:"


def context_pieces(persona, history) -> list[str]:
    """[persona part, one piece per history utterance, final ' R:']; their concatenation is the context."""
    head = f"given persona: {persona_text(persona)}; context:"
    turns = [f" {label}: {text}" for label, text in zip(turn_labels(len(history)), history)]
    return [head, *turns, REPLY_TAG]


def format_context(persona, history) -> str:
    """The paper's context string (no bos); the response follows as ' ' + response."""
    return "".join(context_pieces(persona, history))


@dataclass
class Encoded:
    context_ids: list[int]  # [bos] (when the tokenizer has one) + context tokens
    response_ids: list[int]  # tokens of " " + response, then eos (a real target); [] without response
    persona_key: str  # " ".join(persona): contrastive pair labels are computed once per persona pair
    turn: int
    dropped_turns: int  # oldest history utterances dropped to fit max_len
    tag_len: int = 0  # tokens of the final REPLY_TAG, the last ones of context_ids
    cut: bool = False  # the newest utterance alone did not fit: only its end was kept

    @property
    def truncated(self) -> bool:
        """Some of the conversation did not fit max_len (old turns dropped, or the newest cut)."""
        return self.dropped_turns > 0 or self.cut


class Encoder:
    """Tokenises samples and truncates them to `prompt_len + context + response <= max_len`."""

    def __init__(self, tokenizer, max_len: int = 512, prompt_len: int = 0):
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise SPTError(
                "the tokenizer has no eos_token_id; SPT trains EOS as a real target of every "
                "response, so a tokenizer with an EOS token is required"
            )
        if prompt_len < 0:
            raise SPTError(f"prompt_len must be >= 0, got {prompt_len}")
        if max_len <= prompt_len:
            raise SPTError(f"max_len ({max_len}) must be larger than prompt_len ({prompt_len})")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.prompt_len = prompt_len
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos_id = tokenizer.eos_token_id
        self.n_skipped = 0  # samples that cannot fit at all (persona + response too long)
        self.n_cut = 0  # newest utterances cut to their end to fit
        self._cache: dict[str, list[int]] = {}
        self._anchor = None

    def tokens(self, piece: str) -> list[int]:
        """The ids `piece` gets inside the joined text (see _encode_pieces), cached."""
        ids = self._cache.get(piece)
        if ids is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            ids = self._encode_pieces([piece])[0]
            self._cache[piece] = ids
        return ids

    def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        """Token ids of each piece as it tokenises *after other text*, so that the pieces of a
        context concatenate to the ids of the joined string.

        A piece that starts with a space is tokenised behind an anchor word and the anchor's ids
        are dropped: SentencePiece tokenizers (Llama-2's family) treat the start of every encode
        call as a word start and would add a stray boundary token (' R:' -> '▁', '▁R', ':'), where
        the joined text has '▁R', ':'. Byte-level BPE gives the same ids either way."""
        out = [None] * len(pieces)
        spaced = [i for i, p in enumerate(pieces) if p.startswith(" ")]
        plain = [i for i, p in enumerate(pieces) if not p.startswith(" ")]
        if plain:
            for i, ids in zip(plain, self.tokenizer([pieces[i] for i in plain], add_special_tokens=False)["input_ids"]):
                out[i] = ids
        if spaced:
            anchor = self._anchor_ids()
            got = self.tokenizer([_ANCHOR + pieces[i] for i in spaced], add_special_tokens=False)["input_ids"]
            for i, ids in zip(spaced, got):
                if ids[:len(anchor)] == anchor:
                    out[i] = ids[len(anchor):]
                else:  # the anchor merged with the piece: tokenise it alone
                    out[i] = self.tokenizer.encode(pieces[i], add_special_tokens=False)
        return out

    def _anchor_ids(self) -> list[int]:
        if self._anchor is None:
            self._anchor = self.tokenizer.encode(_ANCHOR, add_special_tokens=False)
        return self._anchor

    def warm(self, samples) -> None:
        """Tokenise, in one batched call, every piece of `samples` that is not cached yet."""
        pieces = {}
        for sample in samples:
            pieces.update(dict.fromkeys(context_pieces(sample.persona, sample.history)))
            pieces[" " + sample.response] = None
        missing = [p for p in pieces if p not in self._cache]
        if len(self._cache) + len(missing) > _CACHE_LIMIT:
            self._cache.clear()
            missing = list(pieces)
        if missing:
            self._cache.update(zip(missing, self._encode_pieces(missing)))

    def encode(self, sample, with_response: bool = True) -> Encoded | None:
        """Encode one sample, dropping its oldest history utterances to fit; None if it cannot fit."""
        head, *turns, tail = context_pieces(sample.persona, sample.history)
        head_ids, tail_ids = self.tokens(head), self.tokens(tail)
        turn_ids = [self.tokens(t) for t in turns]
        response_ids = self.tokens(" " + sample.response) + [self.eos_id] if with_response else []

        budget = self.max_len - self.prompt_len - len(self.bos) - len(head_ids) - len(tail_ids) - len(response_ids)
        if budget < 0:
            self.n_skipped += 1
            return None
        # Keep the longest suffix of the history that fits: newest turns matter most for the reply.
        start = len(turn_ids)
        while start > 0 and len(turn_ids[start - 1]) <= budget:
            start -= 1
            budget -= len(turn_ids[start])
        cut = None
        if start == len(turn_ids) and turn_ids:
            # The newest utterance alone is over budget: keep its end rather than lose it all.
            cut = self._cut_to_fit(turns[-1], budget)
            if cut is not None:
                start -= 1
                self.n_cut += 1

        context_ids = list(self.bos) + head_ids
        for ids in ([cut] if cut is not None else turn_ids[start:]):
            context_ids += ids
        context_ids += tail_ids
        return Encoded(
            context_ids=context_ids,
            response_ids=response_ids,
            persona_key=persona_text(sample.persona),
            turn=sample.turn,
            dropped_turns=start,
            tag_len=len(tail_ids),
            cut=cut is not None,
        )

    def _cut_to_fit(self, piece: str, budget: int) -> list[int] | None:
        """Ids of `piece` (" Q: text") with its text cut from the front to fit `budget` tokens
        (at a word boundary where one is near); None when not even its label fits."""
        label, _, text = piece.partition(": ")
        label += ":"

        def ids(keep: int) -> list[int]:
            tail = text[len(text) - keep:]
            return self._encode_pieces([f"{label} {tail}" if tail else label])[0]

        if len(ids(0)) > budget:
            return None
        lo, hi = 0, len(text)  # the most characters kept from the end that still fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(ids(mid)) <= budget:
                lo = mid
            else:
                hi = mid - 1
        space = text.find(" ", len(text) - lo)
        keep = len(text) - space - 1 if 0 <= space < len(text) - 1 and lo - (len(text) - space - 1) < 24 else lo
        return ids(keep)


def encode_all(encoder: Encoder, samples, desc: str = "encode") -> list[Encoded]:
    """Encode every sample; too-long ones are skipped, over-long newest utterances cut, with one
    warning giving the counts."""
    if not samples:
        raise DataError("no samples to encode")
    skipped_before, cut_before = encoder.n_skipped, encoder.n_cut
    out = []
    with tqdm(total=len(samples), desc=desc, unit="sample", disable=len(samples) <= _PROGRESS_MIN) as bar:
        for start in range(0, len(samples), _CHUNK):
            chunk = samples[start:start + _CHUNK]
            encoder.warm(chunk)
            out += [e for e in map(encoder.encode, chunk) if e is not None]
            bar.update(len(chunk))
    skipped, cut = encoder.n_skipped - skipped_before, encoder.n_cut - cut_before
    if not out:
        raise DataError(
            f"{desc}: all {len(samples)} samples are too long for max_len={encoder.max_len} "
            f"(prompt_len={encoder.prompt_len}) even with the whole history dropped"
        )
    if skipped or cut:
        warnings.warn(
            f"{desc}: skipped {skipped} of {len(samples)} samples whose persona + response alone "
            f"exceed max_len={encoder.max_len} (prompt_len={encoder.prompt_len}); cut {cut} over-long "
            "newest utterances to their end",
            stacklevel=2,
        )
    return out
