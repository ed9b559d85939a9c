"""Dialogue samples from ConvAI2 ParlAI text, JSONL, or the chitchat_dataset package.

Every loader yields `Sample`s: one per reply of "self", with the persona and every earlier
utterance of the dialogue (oldest first, the partner's last utterance at the end).
"""
import json
import os
import re
import sys
import zlib
from dataclasses import dataclass

from ..errors import DataError, SPTError

YOUR_PERSONA = "your persona:"
PARTNER_PERSONA = "partner's persona:"
# ParlAI's stand-in for "the partner said nothing" (self opens the dialogue).
SILENCE = "__SILENCE__"
FORMATS = ("convai2", "jsonl", "chitchat")
_EXTENSIONS = {".txt": "convai2", ".jsonl": "jsonl", ".json": "jsonl"}
_NUMBERED = re.compile(r"(\d+)(?: (.*))?")


@dataclass(frozen=True)
class Sample:
    persona: tuple[str, ...]  # persona sentences (may be empty)
    history: tuple[str, ...]  # earlier utterances, oldest first; history[-1] is the partner's last
    response: str  # the gold reply of "self"
    dialog_id: str
    turn: int  # len(history) // 2: the exchange index, for the prompt-usage-per-turn plot


def clean(text: str) -> str:
    # One space everywhere: a newline inside a turn would collide with the reply cut at "\n".
    return " ".join(text.split())


def _make_sample(persona, history, response, dialog_id) -> Sample:
    history = tuple(history)
    return Sample(tuple(persona), history, response, dialog_id, len(history) // 2)


def _read_lines(path) -> list[str]:
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a data file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            # Split on "\n" only: str.splitlines would also break at form feeds and U+2028
            # inside an utterance and shift every later line number.
            return [line.rstrip("\r") for line in f.read().split("\n")]
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


class Skipped:
    """Samples with nothing to learn (an empty response): skipped and summed up in one line, or,
    with strict, an error at the first one. Structural errors always stop the load."""

    def __init__(self, path, strict: bool):
        self.path, self.strict, self.places = path, strict, []

    def add(self, lineno: int, what: str) -> None:
        if self.strict:
            raise DataError(f"{self.path}:{lineno}: {what} (without --strict such samples are skipped)")
        self.places.append(f"{self.path}:{lineno}")

    def report(self) -> None:
        if self.places:
            shown = ", ".join(self.places[:3]) + (", ..." if len(self.places) > 3 else "")
            print(f"{self.path}: skipped {len(self.places)} sample(s) with an empty response ({shown}); "
                  "--strict makes them errors", file=sys.stderr, flush=True)


def load_convai2(path, strict: bool = False, keep_silence: bool = False) -> list[Sample]:
    """ParlAI text: `N your persona: ...` lines, then `N partner\\tself[\\treward][\\tcands]` lines."""
    name = os.path.basename(path)
    skipped = Skipped(path, strict)
    samples: list[Sample] = []
    persona: list[str] = []
    history: list[str] = []
    n_dialogs = 0
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        match = _NUMBERED.fullmatch(line)
        if match is None:
            raise DataError(f"{path}:{lineno}: expected a line number and a space at the start, got {line[:40]!r}")
        number, body = int(match.group(1)), match.group(2) or ""
        if number == 1 or n_dialogs == 0:
            n_dialogs += 1
            persona, history = [], []
        dialog_id = f"{name}:{n_dialogs - 1}"

        if body.startswith(YOUR_PERSONA) or body.startswith(PARTNER_PERSONA):
            if history:
                raise DataError(f"{path}:{lineno}: persona line after the dialogue's turns started")
            if body.startswith(YOUR_PERSONA):
                sentence = clean(body[len(YOUR_PERSONA):])
                if not sentence:
                    raise DataError(f"{path}:{lineno}: empty persona sentence")
                persona.append(sentence)
            continue

        fields = body.split("\t")
        if len(fields) < 2:
            raise DataError(f"{path}:{lineno}: turn line has no tab between partner utterance and response")
        partner, response = clean(fields[0]), clean(fields[1])
        # Fields after the response (reward, candidates) are not used by SPT.
        # __SILENCE__ (self opens the dialogue) is dropped, or kept as a turn as the authors' code does.
        if partner and (partner != SILENCE or keep_silence):
            history.append(partner)
        if response:
            samples.append(_make_sample(persona, history, response, dialog_id))
        else:
            skipped.add(lineno, "empty response (field 2)")
        # An empty turn stays in the history: dropping it would flip the Q/R labels of older turns.
        history.append(response)
    skipped.report()
    if not samples:
        raise DataError(f"{path}: no dialogue turns found (empty file or persona lines only)")
    return samples


def _str_list(value, lineno, path, field) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{path}:{lineno}: field '{field}' must be a list of strings")
    return [clean(v) for v in value]


def _json_rows(path):
    """(line number, JSON object) for each non-blank line of a JSONL file; DataError naming the line."""
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: bad JSON ({e.msg}); expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def _persona(row, lineno, path) -> list[str]:
    persona = row.get("persona", [])
    if isinstance(persona, str):
        persona = [persona]
    return [p for p in _str_list(persona, lineno, path, "persona") if p]


def load_contexts(path) -> list[Sample]:
    """JSONL rows {"persona": [..] | ".." (optional), "history": [..]} to reply to: no response needed."""
    samples = []
    for lineno, row in _json_rows(path):
        if "history" not in row:
            raise DataError(f"{path}:{lineno}: missing field 'history'")
        history = _str_list(row["history"], lineno, path, "history")
        samples.append(Sample(tuple(_persona(row, lineno, path)), tuple(history), "", f"row{lineno}",
                              len(history) // 2))
    if not samples:
        raise DataError(f"{path}: no rows (empty file)")
    return samples


def load_jsonl(path, strict: bool = False) -> list[Sample]:
    """One JSON object per line: {"persona": [..] | "..", "history": [..], "response": "..", "dialog_id"?}."""
    name = os.path.basename(path)
    skipped = Skipped(path, strict)
    samples: list[Sample] = []
    # Rows of one dialogue share the persona and the opening utterance; grouping by that key keeps
    # a dialogue on one side of the train/valid split when the file has no dialog_id.
    opening_ids: dict[tuple, str] = {}
    for lineno, row in _json_rows(path):
        for field in ("persona", "history", "response"):
            if field not in row:
                raise DataError(f"{path}:{lineno}: missing field '{field}'")
        persona = _persona(row, lineno, path)
        # Empty history entries stay: dropping one would flip the Q/R labels of all older turns.
        history = _str_list(row["history"], lineno, path, "history")
        if not isinstance(row["response"], str):
            raise DataError(f"{path}:{lineno}: field 'response' must be a string")
        response = clean(row["response"])
        if not response:
            skipped.add(lineno, "field 'response' is empty")
            continue
        if "dialog_id" in row:
            if not isinstance(row["dialog_id"], (str, int)):
                raise DataError(f"{path}:{lineno}: field 'dialog_id' must be a string or an integer")
            dialog_id = str(row["dialog_id"])
        else:
            key = (tuple(persona), history[0] if history else response)
            dialog_id = opening_ids.setdefault(key, f"{name}:{lineno}")
        samples.append(_make_sample(persona, history, response, dialog_id))
    skipped.report()
    if not samples:
        raise DataError(f"{path}: no samples (empty file, or no row with a response)")
    return samples


def _chitchat_turns(messages, where) -> list[str]:
    """Merge consecutive messages of one sender (within and across groups) into one turn each."""
    turns: list[str] = []
    last_sender = object()
    if not isinstance(messages, list):
        raise DataError(f"{where}: field 'messages' must be a list")
    for group in messages:
        if not isinstance(group, list):
            raise DataError(f"{where}: each entry of 'messages' must be a list of messages")
        for msg in group:
            if not isinstance(msg, dict) or not isinstance(msg.get("text"), str) or "sender" not in msg:
                raise DataError(f"{where}: a message lacks a string 'text' or a 'sender'")
            text = clean(msg["text"])
            if not text:
                continue
            if msg["sender"] == last_sender:
                turns[-1] += " " + text
            else:
                turns.append(text)
                last_sender = msg["sender"]
    return turns


def load_chitchat(persona: str = "prompt", path: str | None = None) -> list[Sample]:
    """The Chit Chat Challenge corpus; persona "prompt" uses the conversation's topic, "none" none.

    `path` reads a file in the same format instead of the copy shipped in the package.
    """
    if persona not in ("prompt", "none"):
        raise SPTError(f"chitchat persona must be 'prompt' or 'none', got {persona!r}")
    try:
        import chitchat_dataset
    except ImportError:
        raise DataError("chitchat: the package chitchat_dataset is not installed (pip install chitchat-dataset)") from None
    source = path or "chitchat_dataset"
    try:
        data = chitchat_dataset.Dataset(path) if path else chitchat_dataset.Dataset()
    except OSError as e:
        raise DataError(f"{source}: cannot read ({e.strerror})") from None
    except (ValueError, TypeError) as e:
        # ValueError covers bad JSON and bad UTF-8; TypeError a JSON that is not an object.
        raise DataError(f"{source}: not a chitchat JSON file, expected an object of conversations ({e})") from None
    samples: list[Sample] = []
    for cid in sorted(data):
        conv = data[cid]
        where = f"{source}: conversation {cid}"
        if not isinstance(conv, dict) or "messages" not in conv:
            raise DataError(f"{where}: missing field 'messages'")
        topic = clean(conv.get("prompt") or "") if persona == "prompt" else ""
        sentences = (topic,) if topic else ()
        turns = _chitchat_turns(conv["messages"], where)
        for i in range(1, len(turns)):
            samples.append(_make_sample(sentences, turns[:i], turns[i], str(cid)))
    if not samples:
        raise DataError(f"{source}: no conversations with at least two turns")
    return samples


def detect_format(path) -> str:
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in _EXTENSIONS:
        raise DataError(
            f"{path}: cannot tell the data format from the extension {ext or '(none)'!r}; "
            f"use .txt (ConvAI2), .jsonl/.json (JSONL) or name the format (one of {', '.join(FORMATS)})"
        )
    return _EXTENSIONS[ext]


def load_samples(data: str, data_format: str | None = None, strict: bool = False,
                 keep_silence: bool = False) -> list[Sample]:
    """`data` is "chitchat" (the packaged corpus) or a path; the format defaults to the extension's.

    Samples with an empty response are skipped with one summary line (errors when `strict`);
    keep_silence keeps ConvAI2's __SILENCE__ turns in the history (the authors' evaluation)."""
    data = str(data)
    if data == "chitchat" and data_format in (None, "auto", "chitchat"):
        return load_chitchat()
    fmt = detect_format(data) if data_format in (None, "auto") else data_format
    if fmt == "convai2":
        return load_convai2(data, strict, keep_silence)
    if fmt == "jsonl":
        return load_jsonl(data, strict)
    if fmt == "chitchat":
        return load_chitchat(path=data)
    raise DataError(f"{data}: unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")


def split_by_dialog(samples, valid_fraction: float = 0.05) -> tuple[list[Sample], list[Sample]]:
    """Deterministic train/valid split by dialogue (ranked by crc32 of dialog_id); order is kept.

    Both halves are non-empty when there are at least two dialogues; with one, valid is empty.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise SPTError(f"valid_fraction must be between 0 and 1 (exclusive), got {valid_fraction}")
    dialogs = sorted({s.dialog_id for s in samples}, key=lambda d: (zlib.crc32(d.encode("utf-8")), d))
    if len(dialogs) < 2:
        return list(samples), []
    n_valid = min(max(round(len(dialogs) * valid_fraction), 1), len(dialogs) - 1)
    valid_ids = set(dialogs[:n_valid])
    train = [s for s in samples if s.dialog_id not in valid_ids]
    valid = [s for s in samples if s.dialog_id in valid_ids]
    return train, valid
