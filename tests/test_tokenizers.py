"""The paper's text is tokenised piece by piece (" Q: ...", " R:", " " + response), and the pieces
must give the ids of the joined string, for byte-level BPE and for SentencePiece (Llama-2's family),
which treats the start of every encode call as a word start. Built offline: a tiny SentencePiece
model trained on the chit-chat corpus and loaded as a Llama tokenizer through transformers, and a
SentencePiece-style tokenizer that adds a word boundary at every call (the old sentencepiece
behaviour), besides the char tokenizer and the embedded SmolLM2 tokenizer."""
import io
import json

import pytest

from spt_fast.data.corpora import Sample
from spt_fast.data.text import REPLY_TAG, Encoder, format_context

SAMPLES = [
    Sample(("i like cats.", "i am tall."), ("hi there", "hello!", "how are you?"), "great, thanks.", "d0", 1),
    Sample((), ("what do you do for fun?",), "I hike a lot", "d1", 0),
    Sample(("i sing.",), (), "Hello! How are you?", "d2", 0),
]


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")  # transformers reads the model file with protobuf
    import chitchat_dataset

    data = chitchat_dataset.Dataset()
    texts = []
    for cid in sorted(data)[:300]:
        turns = [m["text"] for group in data[cid]["messages"] for m in group]
        texts.append(f"given persona: {data[cid].get('prompt') or ''}; context:"
                     + "".join(f" {'Q' if i % 2 == 0 else 'R'}: {t}" for i, t in enumerate(turns)) + " R:")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=800,
                                   model_type="bpe", pad_id=0, bos_id=1, eos_id=2, unk_id=3, byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2)
    folder = tmp_path_factory.mktemp("sentencepiece")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


def llama_tokenizer(folder, legacy):
    from transformers import AutoTokenizer

    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "pad_token": "<pad>", "legacy": legacy, "add_bos_token": True}))
    return AutoTokenizer.from_pretrained(folder)


def always_prefix_tokenizer(sp_tok):
    """The same vocabulary, with a word boundary added at the start of every encode call, as the
    Llama-2 tokenizer.json files of transformers 4 did (normalizer: prepend '▁', spaces -> '▁'):
    ' R:' alone becomes '▁', '▁R', ':'."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    backend = sp_tok.backend_tokenizer.__class__.from_str(sp_tok.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def check_pieces_join(tok, words: bool = True):
    enc = Encoder(tok, 512, 4)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for s in SAMPLES:
        e = enc.encode(s)
        joined = format_context(s.persona, s.history) + " " + s.response
        want = bos + tok.encode(joined, add_special_tokens=False)
        assert e.context_ids + e.response_ids[:-1] == want, (s, tok.convert_ids_to_tokens(e.context_ids))
        assert e.response_ids[-1] == tok.eos_token_id
        first = tok.convert_ids_to_tokens(e.response_ids[0])
        if words:  # (a character tokenizer has only characters: its first target is the space)
            assert first.strip("▁Ġ ") != "", f"first response target is a lone boundary token {first!r}"
        tag = enc.tokens(REPLY_TAG)
        assert e.tag_len == len(tag) and e.context_ids[-e.tag_len:] == tag
    return enc


@pytest.mark.parametrize("legacy", [True, False])
def test_sentencepiece_llama_tokenizer_pieces_equal_the_joined_text(sentencepiece_dir, legacy):
    tok = llama_tokenizer(sentencepiece_dir, legacy)
    enc = check_pieces_join(tok)
    assert tok.convert_ids_to_tokens(enc.tokens(REPLY_TAG)) == ["▁R", ":"]


def test_a_tokenizer_that_marks_every_call_as_a_word_start(sentencepiece_dir):
    tok = always_prefix_tokenizer(llama_tokenizer(sentencepiece_dir, False))
    # Tokenised alone, a piece gets a stray boundary token ...
    assert tok.convert_ids_to_tokens(tok.encode(REPLY_TAG, add_special_tokens=False))[0] == "▁"
    # ... which the encoder's pieces do not have: they still join to the text's ids.
    enc = check_pieces_join(tok)
    assert tok.convert_ids_to_tokens(enc.tokens(REPLY_TAG)) == ["▁R", ":"]


def test_char_tokenizer_pieces_equal_the_joined_text(char_tok):
    enc = check_pieces_join(char_tok, words=False)
    assert len(enc.tokens(REPLY_TAG)) == 3


@pytest.mark.slow
def test_embedded_tokenizer_pieces_equal_the_joined_text():
    from spt_fast.model.loading import load_tokenizer

    tok = load_tokenizer("default")
    enc = check_pieces_join(tok)
    assert tok.convert_ids_to_tokens(enc.tokens(REPLY_TAG)) == ["ĠR", ":"]
