"""Data loading (ConvAI2, JSONL, chitchat), the paper's text format, encoding and truncation."""
import json
from pathlib import Path

import pytest

from spt_fast.data.corpora import (
    Sample, load_chitchat, load_convai2, load_jsonl, load_samples, split_by_dialog,
)
from spt_fast.errors import DataError, SPTError
from spt_fast.data.text import Encoder, encode_all, format_context

FIX = Path(__file__).parent / "fixtures"


def sample(persona=("i like tea .",), history=("hi !",), response="hello .", dialog_id="d", turn=None):
    history = tuple(history)
    return Sample(tuple(persona), history, response, dialog_id, len(history) // 2 if turn is None else turn)


def decode(tok, ids):
    return tok.decode(ids)


# ---------------------------------------------------------------- ConvAI2


def test_convai2_original_parses_dialogues_in_order():
    samples = load_convai2(FIX / "tiny_self_original.txt")
    assert len(samples) == 7
    assert len({s.dialog_id for s in samples}) == 3

    first, second, third = samples[:3]
    assert first.persona == ("i have two cats .", "i work as a baker .", "my favorite color is green .")
    assert first.history == ("hi , how are you today ?",)
    assert first.response == "i am good , just got home from the bakery ."
    assert first.turn == 0
    assert second.history == (
        "hi , how are you today ?",
        "i am good , just got home from the bakery .",
        "oh nice , what do you bake ?",
    )
    assert second.turn == 1
    assert third.history[-1] == "i am allergic to cats ."
    assert len(third.history) == 5 and third.turn == 2
    assert third.response == "that is too bad , they are sweet ."
    assert first.dialog_id == second.dialog_id == third.dialog_id

    # A line numbered 1 starts a new dialogue: persona and history start over.
    fourth = samples[3]
    assert fourth.dialog_id != first.dialog_id
    assert fourth.persona == ("i love to swim .", "i live by the sea .")
    assert fourth.history == ("hello there !",)
    assert samples[-1].persona == ("i play the violin .", "i am a student .")
    assert samples[-1].response == "thanks , i need it ."


def test_convai2_candidates_and_reward_fields_are_ignored():
    samples = load_convai2(FIX / "tiny_self_original_cands.txt")
    assert [s.response for s in samples] == ["i am good , just got home .", "mostly bread ."]
    assert samples[1].history == ("hi , how are you today ?", "i am good , just got home .", "what do you bake ?")
    assert samples[0].persona == ("i have two cats .", "i work as a baker .")


def test_convai2_revised_partner_persona_and_silence():
    samples = load_convai2(FIX / "tiny_self_revised_no_cands.txt")
    assert len(samples) == 4
    # partner's persona lines are read and dropped; only "your persona" is the persona.
    assert samples[0].persona == ("cats are my furry friends .", "bread is what i make for a living .")
    assert samples[1].history == ("hey , what is new ?", "not much , baking all day .", "do you like it ?")
    # __SILENCE__ means self opens the dialogue: nothing from the partner enters the history.
    opener, reply = samples[2], samples[3]
    assert opener.persona == ("i enjoy the ocean .",)
    assert opener.history == () and opener.turn == 0
    assert reply.history == ("hi , anyone around ?", "yes , i am here .") and reply.turn == 1


def test_convai2_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "x_self_original.txt"
    path.write_bytes(b"1 your persona: i sing .\r\n\r\n2 hi\thello .\r\n3 how ?\tfine .\r\n")
    samples = load_convai2(path)
    assert [s.response for s in samples] == ["hello .", "fine ."]
    assert samples[1].history == ("hi", "hello .", "how ?")


@pytest.mark.parametrize(
    "name, lineno, words",
    [
        ("bad_no_number.txt", 3, "line number"),
        ("bad_no_tab.txt", 4, "no tab"),
    ],
)
def test_convai2_malformed_line_names_file_and_line(name, lineno, words):
    path = FIX / name
    with pytest.raises(DataError) as err:
        load_convai2(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{lineno}: ")
    assert words in msg


def test_empty_responses_are_skipped_and_summed_up_or_errors_with_strict(tmp_path, capsys):
    path = FIX / "bad_empty_response.txt"
    samples = load_convai2(path)
    assert [s.response for s in samples] == ["hello !"]  # the line with nothing to learn is skipped
    err = capsys.readouterr().err
    assert f"skipped 1 sample(s) with an empty response ({path}:3)" in err and "--strict" in err
    with pytest.raises(DataError) as exc:
        load_convai2(path, strict=True)
    assert str(exc.value).startswith(f"{path}:3: empty response")
    # The empty turn keeps its place in the history, so later Q/R labels stay right.
    many = tmp_path / "gaps.txt"
    many.write_text("1 your persona: i sing .\n2 hi\thello .\n3 how ?\t\n4 and you ?\tfine .\n"
                    "5 ok\t \n6 bye\t\n7 see ya\tbye .\n")
    got = load_convai2(many)
    assert [s.response for s in got] == ["hello .", "fine .", "bye ."]
    assert got[1].history == ("hi", "hello .", "how ?", "", "and you ?")
    err = capsys.readouterr().err
    assert "skipped 3 sample(s)" in err and f"{many}:3, {many}:5, {many}:6" in err
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"persona": [], "history": ["hi"], "response": " "}\n'
                    '{"persona": [], "history": ["hi"], "response": "yo"}\n')
    assert [s.response for s in load_jsonl(rows)] == ["yo"]
    with pytest.raises(DataError, match=f"{rows}:1: field 'response' is empty"):
        load_jsonl(rows, strict=True)


@pytest.mark.parametrize("name", ["empty.txt", "persona_only.txt"])
def test_convai2_without_turns_is_an_error(name):
    with pytest.raises(DataError, match=name):
        load_convai2(FIX / name)


def test_convai2_persona_after_turns_is_an_error(tmp_path):
    path = tmp_path / "late.txt"
    path.write_text("1 your persona: a .\n2 hi\thello .\n3 your persona: b .\n")
    with pytest.raises(DataError, match=r"late\.txt:3: persona line"):
        load_convai2(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_convai2(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="directory"):
        load_jsonl(tmp_path)


# ---------------------------------------------------------------- JSONL


def test_jsonl_rows_and_dialog_grouping():
    samples = load_jsonl(FIX / "tiny.jsonl")
    assert len(samples) == 5
    assert samples[0].persona == ("i like tea .", "i have a dog .")
    assert samples[1].history == ("hi !", "hello , want some tea ?", "sure , thanks .")
    assert samples[1].turn == 1
    # A persona given as a string is one sentence.
    assert samples[2].persona == ("i run marathons .",) and samples[2].history == ()
    # Without dialog_id, rows sharing persona + opening utterance are one dialogue.
    assert samples[0].dialog_id == samples[1].dialog_id
    assert samples[2].dialog_id == samples[3].dialog_id
    assert samples[0].dialog_id != samples[2].dialog_id
    assert samples[4].dialog_id == "d42" and samples[4].persona == ()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("bad_missing_response.jsonl", ":2: missing field 'response'"),
        ("bad_json.jsonl", ":3: bad JSON"),
    ],
)
def test_jsonl_bad_rows_name_file_line_and_field(name, expected):
    path = FIX / name
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert str(err.value).startswith(f"{path}{expected}")


@pytest.mark.parametrize(
    "row, field",
    [
        ({"persona": [], "history": "hi", "response": "x"}, "history"),
        ({"persona": [1], "history": [], "response": "x"}, "persona"),
        ({"persona": [], "history": [], "response": 3}, "response"),
        ({"persona": [], "response": "x"}, "history"),
    ],
)
def test_jsonl_mistyped_fields(tmp_path, row, field):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"persona": [], "history": [], "response": "ok"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"rows\.jsonl:2: .*'{field}'"):
        load_jsonl(path)


def test_jsonl_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl"):
        load_jsonl(path)


# ---------------------------------------------------------------- chitchat


def test_chitchat_merges_runs_of_one_sender(tmp_path):
    conv = {
        "c2": {"prompt": "What is your dream job?", "messages": [
            [{"text": "hi", "sender": "a"}, {"text": "there", "sender": "a"}],
            [{"text": "hello", "sender": "b"}],
            [{"text": "so,", "sender": "b"}, {"text": "", "sender": "b"}],  # same sender as the group before
            [{"text": "pilot.\nyou?", "sender": "a"}],
        ]},
        "c1": {"prompt": None, "messages": [[{"text": "yo", "sender": "x"}], [{"text": "sup", "sender": "y"}]]},
        "c0": {"messages": [[{"text": "alone", "sender": "x"}]]},
    }
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(conv))
    samples = load_chitchat(path=str(path))
    # Sorted conversation ids; a one-turn conversation gives no sample.
    assert [s.dialog_id for s in samples] == ["c1", "c2", "c2"]
    assert samples[0].persona == () and samples[0].history == ("yo",) and samples[0].response == "sup"
    assert samples[1].persona == ("What is your dream job?",)
    assert samples[1].history == ("hi there",) and samples[1].response == "hello so,"
    assert samples[2].history == ("hi there", "hello so,") and samples[2].response == "pilot. you?"
    assert samples[2].turn == 1
    assert all(s.persona == () for s in load_chitchat(persona="none", path=str(path)))
    assert load_samples(str(path), "chitchat") == samples


def test_chitchat_real_package():
    samples = load_samples("chitchat")
    assert len(samples) > 100_000
    conv = [s for s in samples if s.dialog_id == "000b1804-038f-443f-a07b-6976fd3bfd76"]
    assert conv[0].persona == ("If money were no object, how would you spend your time?",)
    assert conv[0].history == ("Hi, how are you doing?",)
    # Two messages in a row from one sender become one turn.
    assert conv[0].response == "I am doing well how are you!"
    assert conv[1].response == "Good! What do you think about that prompt? How would you spend your time?"
    assert [s.turn for s in conv[:4]] == [0, 1, 1, 2]
    # Consecutive turns always come from different senders, so no two adjacent history entries merge.
    assert conv[3].history[:-1] == conv[2].history and conv[3].history[-1] == conv[2].response


def test_chitchat_bad_persona_option():
    with pytest.raises(SPTError, match="persona"):
        load_chitchat(persona="topic")


# ---------------------------------------------------------------- load_samples / split


def test_load_samples_detects_format(tmp_path):
    assert load_samples(str(FIX / "tiny_self_original.txt")) == load_convai2(FIX / "tiny_self_original.txt")
    assert load_samples(str(FIX / "tiny.jsonl")) == load_jsonl(FIX / "tiny.jsonl")
    copy = tmp_path / "rows.data"
    copy.write_text((FIX / "tiny.jsonl").read_text())
    assert len(load_samples(str(copy), "jsonl")) == 5


def test_load_samples_unknown_format(tmp_path):
    path = tmp_path / "dialogs.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match="dialogs.csv"):
        load_samples(str(path))
    with pytest.raises(DataError, match="unknown data format 'parquet'"):
        load_samples(str(path), "parquet")


def _many_dialogs(n):
    return [sample(dialog_id=f"dlg{i}", response=f"r{i}.{j}") for i in range(n) for j in range(3)]


def test_split_by_dialog_is_deterministic_and_disjoint():
    samples = _many_dialogs(200)
    train, valid = split_by_dialog(samples, 0.1)
    assert (train, valid) == split_by_dialog(list(samples), 0.1)
    train_ids, valid_ids = {s.dialog_id for s in train}, {s.dialog_id for s in valid}
    assert not train_ids & valid_ids
    assert len(valid_ids) == 20
    assert len(train) + len(valid) == len(samples)
    # Order within each half is the input order, and every dialogue is kept whole.
    assert train == [s for s in samples if s.dialog_id in train_ids]
    assert all(len([s for s in valid if s.dialog_id == d]) == 3 for d in valid_ids)


def test_split_small_sets():
    train, valid = split_by_dialog(_many_dialogs(2), 0.01)
    assert len(train) == 3 and len(valid) == 3
    train, valid = split_by_dialog(_many_dialogs(2), 0.99)
    assert len(train) == 3 and len(valid) == 3
    train, valid = split_by_dialog(_many_dialogs(1), 0.5)
    assert len(train) == 3 and valid == []
    with pytest.raises(SPTError):
        split_by_dialog(_many_dialogs(3), 0.0)


# ---------------------------------------------------------------- text format


def test_format_context_exact_string():
    persona = ("i have two cats .", "i bake bread .")
    history = ("hi !", "hello , how are you ?", "good , you ?")
    ctx = format_context(persona, history)
    assert ctx == (
        "given persona: i have two cats . i bake bread .; context: "
        "Q: hi ! R: hello , how are you ? Q: good , you ? R:"
    )
    # The response follows after one space: the joined text is the paper's "... R: {response}".
    assert ctx + " " + "fine ." == (
        "given persona: i have two cats . i bake bread .; context: "
        "Q: hi ! R: hello , how are you ? Q: good , you ? R: fine ."
    )


def test_format_context_labels_count_from_the_end():
    assert format_context((), ()) == "given persona: ; context: R:"
    # Even-length history (self opened the dialogue): the oldest utterance is R.
    assert format_context(("p",), ("a", "b")) == "given persona: p; context: R: a Q: b R:"
    assert format_context(("p",), ("b",)) == "given persona: p; context: Q: b R:"


# ---------------------------------------------------------------- encoding


def test_encode_round_trip(char_tok):
    s = sample(persona=("i like tea .", "i run ."), history=("hi !", "hey .", "tea ?"), response="yes please .")
    enc = Encoder(char_tok, max_len=512).encode(s)
    assert enc.context_ids[0] == char_tok.bos_token_id
    assert decode(char_tok, enc.context_ids[1:]) == format_context(s.persona, s.history)
    assert enc.response_ids[-1] == char_tok.eos_token_id
    assert char_tok.eos_token_id not in enc.response_ids[:-1]
    assert decode(char_tok, enc.response_ids[:-1]) == " yes please ."
    assert enc.persona_key == "i like tea . i run ."
    assert enc.turn == 1 and enc.dropped_turns == 0


def test_encode_without_response(char_tok):
    s = sample(history=("a" * 20,), response="b" * 50)
    encoder = Encoder(char_tok, max_len=80)
    assert encoder.encode(s) is None  # the response alone does not fit
    enc = encoder.encode(s, with_response=False)
    assert enc.response_ids == [] and enc.dropped_turns == 0


def test_truncation_drops_oldest_turns_and_keeps_alignment(char_tok):
    persona = ("i like tea .",)
    history = ("q1 q1 q1", "r1 r1 r1", "q2 q2 q2", "r2 r2 r2", "q3 q3 q3")
    s = sample(persona=persona, history=history, response="r3 r3 r3")
    full = Encoder(char_tok, max_len=512).encode(s)
    total = len(full.context_ids) + len(full.response_ids)
    piece = len(" Q: q1 q1 q1")

    prompt_len = 8
    # Room for everything except two history pieces (and then some, but not a third).
    max_len = total + prompt_len - 2 * piece + 3
    enc = Encoder(char_tok, max_len=max_len, prompt_len=prompt_len).encode(s)
    assert enc.dropped_turns == 2
    assert prompt_len + len(enc.context_ids) + len(enc.response_ids) <= max_len
    text = decode(char_tok, enc.context_ids[1:])
    assert text == format_context(persona, history[2:])
    # The kept turns keep their labels: the partner's last utterance is still Q.
    assert text.endswith("Q: q3 q3 q3 R:") and "Q: q2 q2 q2 R: r2 r2 r2" in text
    assert text.startswith("given persona: i like tea .; context: Q: q2")
    assert enc.response_ids == full.response_ids

    # Odd number dropped: the first kept utterance is an R turn.
    enc = Encoder(char_tok, max_len=total - piece).encode(s)
    assert enc.dropped_turns == 1
    assert decode(char_tok, enc.context_ids[1:]) == format_context(persona, history[1:])
    assert "context: R: r1 r1 r1 Q: q2" in decode(char_tok, enc.context_ids)

    # Only persona + response fit: the whole history goes, the persona stays.
    bare = len(char_tok.encode(format_context(persona, ()), add_special_tokens=False)) + 1
    enc = Encoder(char_tok, max_len=bare + len(full.response_ids)).encode(s)
    assert enc.dropped_turns == len(history)
    assert decode(char_tok, enc.context_ids[1:]) == "given persona: i like tea .; context: R:"


def test_encode_all_skips_and_warns(char_tok):
    short = sample(response="ok .")
    long = sample(persona=("x" * 100,), response="ok .")
    encoder = Encoder(char_tok, max_len=80)
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        out = encode_all(encoder, [short, long, short])
    assert len(out) == 2 and encoder.n_skipped == 1
    with pytest.raises(DataError, match="too long"):
        encode_all(encoder, [long])
    with pytest.raises(DataError, match="no samples"):
        encode_all(encoder, [])


def test_encode_all_matches_encode(char_tok):
    samples = load_convai2(FIX / "tiny_self_original.txt")
    batched = encode_all(Encoder(char_tok, max_len=160, prompt_len=4), samples)
    single = [Encoder(char_tok, max_len=160, prompt_len=4).encode(s) for s in samples]
    assert batched == single
    assert any(e.dropped_turns for e in batched)


def test_encoder_needs_eos(char_tok):
    class NoEos:
        eos_token_id = None
        bos_token_id = 1

    with pytest.raises(SPTError, match="eos"):
        Encoder(NoEos())
    with pytest.raises(SPTError, match="max_len"):
        Encoder(char_tok, max_len=8, prompt_len=8)
