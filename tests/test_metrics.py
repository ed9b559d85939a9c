"""Metrics and plots against hand-computed values (and sacrebleu / a brute-force BERTScore)."""
import math

import numpy as np
import pytest
import sacrebleu
import torch

from spt_fast.data import pairs
from spt_fast.evaluation import metrics, plots
from spt_fast.generation import stops
from spt_fast.errors import SPTError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- cut_reply ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, want", [
    ("  i like tea \nQ: and you?", "i like tea"),
    ("i like tea Q: and you?", "i like tea"),
    ("i like tea R: me too", "i like tea"),
    ("no stop here  ", "no stop here"),
    ("", ""),
])
def test_cut_reply_each_stop(raw, want):
    assert stops.cut_reply(raw) == want


def test_cut_reply_takes_earliest_stop_not_first_listed():
    # "R:" comes before "\n" in the text, though "\n" is listed first.
    assert stops.cut_reply("yes R: no\nQ: maybe") == "yes"
    assert stops.cut_reply("a|b;c", stops=(";", "|")) == "a"


# ---- F1 -------------------------------------------------------------------------------------

def test_unigram_f1_hand_computed():
    # "a b c" vs "a b d": 2 common, P = R = 2/3 -> F1 = 2/3.
    assert metrics.unigram_f1(["a b c"], ["a b d"]) == pytest.approx(200 / 3, abs=1e-9)
    # Case-folded; P = 1/1, R = 1/4 -> F1 = 2*(1*0.25)/1.25 = 0.4.
    assert metrics.unigram_f1(["Dogs"], ["i love dogs ."]) == pytest.approx(40.0)
    # Multiset overlap: "a a a" vs "a b": common 1, P = 1/3, R = 1/2 -> F1 = 0.4.
    assert metrics.unigram_f1(["a a a"], ["a b"]) == pytest.approx(40.0)


def test_unigram_f1_mean_and_empty_rules():
    # Per-sample mean: (100 + 0 + 100 [both empty] + 0 [one empty]) / 4 = 50.
    preds = ["x y", "x", "", ""]
    refs = ["y x", "z", "  ", "z"]
    assert metrics.unigram_f1(preds, refs) == pytest.approx(50.0)
    with pytest.raises(SPTError, match="2 predictions but 1 references"):
        metrics.unigram_f1(["a", "b"], ["a"])


# ---- BLEU -----------------------------------------------------------------------------------

def test_bleu_matches_sacrebleu_and_identity():
    preds = ["i have two dogs and a cat .", "i work as a nurse in the city", "hello there"]
    refs = ["i have two dogs and one cat .", "i am a nurse in a big city", "hi , how are you ?"]
    assert metrics.bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    long = ["the quick brown fox jumps over the lazy dog near the river bank today"]
    assert metrics.bleu(long, long) == pytest.approx(100.0)


def test_sentence_bleu_separates_persona_pairs():
    a = "i love dogs . i work as a nurse . my favourite colour is blue ."
    near = "i love dogs . i work as a nurse . my favourite colour is red ."
    far = "i surf every weekend and drive an old truck"
    assert pairs.sentence_bleu(a, a) == pytest.approx(100.0)
    assert pairs.sentence_bleu(near, a) > 20
    assert pairs.sentence_bleu(far, a) < 20
    assert pairs.sentence_bleu(near, a) == pytest.approx(sacrebleu.sentence_bleu(near, [a]).score)


# ---- ROUGE ----------------------------------------------------------------------------------

def test_rouge_known_pair():
    # ref: the cat sat on the mat / pred: the cat sat on a mat
    # overlap the,cat,sat,on,mat = 5 of 6 each side -> 5/6.
    # common bigrams the-cat, cat-sat, sat-on = 3 of 5 each side -> 3/5.
    # R-L: LCS "the cat sat on mat" = 5 -> 5/6.
    out = metrics.rouge(["the cat sat on a mat"], ["the cat sat on the mat"])
    assert out["rouge1"] == pytest.approx(500 / 6)
    assert out["rouge2"] == pytest.approx(60.0)
    assert out["rougeL"] == pytest.approx(500 / 6)


def test_rouge_mean_over_samples():
    # pred "a b" vs ref "a b c d": P=1, R=1/2 -> F=2/3; the second pair shares nothing -> 0.
    out = metrics.rouge(["a b", "x"], ["a b c d", "y"])
    assert out["rouge1"] == pytest.approx((200 / 3 + 0) / 2)


# ---- Distinct -------------------------------------------------------------------------------

def test_distinct_tiny_corpus():
    preds = ["a b a", "a b c"]
    # unigrams a b a a b c: 3 unique of 6 -> 50.
    assert metrics.distinct(preds, 1) == pytest.approx(50.0)
    # bigrams (a b) (b a) | (a b) (b c): 3 unique of 4 -> 75; none spans the two replies.
    assert metrics.distinct(preds, 2) == pytest.approx(75.0)
    assert metrics.distinct(["one", ""], 2) == 0.0
    assert metrics.distinct([], 1) == 0.0


# ---- compute_metrics / format_table ---------------------------------------------------------

def test_compute_metrics_keys_and_values():
    preds = ["a b c", "i like dogs"]
    refs = ["a b d", "i like cats"]
    out = metrics.compute_metrics(preds, refs)
    assert set(out) == {"n", "f1", "bleu", "rouge1", "rouge2", "rougeL", "dist1", "dist2"}
    assert out["n"] == 2
    assert out["f1"] == pytest.approx(200 / 3)
    # 6 unigrams all distinct; 4 bigrams all distinct.
    assert out["dist1"] == pytest.approx(100.0) and out["dist2"] == pytest.approx(100.0)


def test_compute_metrics_errors():
    with pytest.raises(SPTError, match="no predictions"):
        metrics.compute_metrics([], [])
    with pytest.raises(SPTError, match="1 predictions but 2 references"):
        metrics.compute_metrics(["a"], ["a", "b"])
    with pytest.raises(SPTError, match="prediction 0 is NoneType"):
        metrics.compute_metrics([None], ["a"])


def test_format_table_has_names_and_numbers():
    rows = {
        "pt": {"n": 7801, "f1": 10.789, "bleu": 1.61, "rouge1": 14.36, "rouge2": 2.67,
               "rougeL": 13.25, "dist1": 3.94, "dist2": 13.674},
        "spt-shared": {"n": 7801, "f1": 11.06, "bleu": 2.22, "rouge1": 16.45, "rouge2": 3.6,
                       "rougeL": 15.42, "dist1": 4.87, "dist2": 17.38, "bert_f1": 54.86},
    }
    table = metrics.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, 2 runs
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "run", "F1", "BLEU", "R-1", "R-2", "R-L", "BERT-F1", "DIST-1", "DIST-2", "n"]
    assert "pt" in lines[2] and "spt-shared" in lines[3]
    for text in ("10.79", "13.67", "3.60", "54.86", "7801"):
        assert text in table
    assert "-" in [c.strip() for c in lines[2].strip("|").split("|")]  # pt has no BERT-F1
    # Without any BERTScore the column is left out.
    assert "BERT-F1" not in metrics.format_table({"pt": rows["pt"]})


# ---- BERTScore ------------------------------------------------------------------------------

WORDS = "i love dogs cats the a my is and blue red work as nurse teacher city".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT plus a word-level tokenizer with [CLS] ... [SEP], saved to disk."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64,
                                 max_position_embeddings=64))
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return str(path), fast, model.eval()


def _brute_force_pr(text_h, text_r, tok, model, specials_match=True):
    """Each string encoded alone (no padding), greedy cosine match. As bert_score: [CLS]/[SEP] may
    be a token's best match but are not averaged themselves (specials_match=False drops them)."""
    def emb(text):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**ids).last_hidden_state[0]
        return torch.nn.functional.normalize(h, dim=-1)

    h, r = emb(text_h), emb(text_r)
    if not specials_match:
        h, r = h[1:-1], r[1:-1]
        sim = h @ r.T
        return sim.max(1).values.mean().item(), sim.max(0).values.mean().item()
    sim = h @ r.T
    return sim.max(1).values[1:-1].mean().item(), sim.max(0).values[1:-1].mean().item()


def test_bertscore_identical_is_100(tiny_bert):
    path, _, _ = tiny_bert
    texts = ["i love dogs", "my city is blue and red", "a nurse"]
    out = metrics.bertscore(texts, texts, path, batch_size=2)
    for key in ("bert_p", "bert_r", "bert_f1"):
        assert out[key] == pytest.approx(100.0, abs=1e-3)
    out = metrics.bertscore(texts, texts, path, layer=1)
    assert out["bert_f1"] == pytest.approx(100.0, abs=1e-3)


def test_bertscore_matches_brute_force_with_padding(tiny_bert):
    # Mixed lengths in one batch, plus a partial last batch: padding and specials must not count.
    path, tok, model = tiny_bert
    preds = ["i love dogs", "my nurse is a teacher and i work", "red"]
    refs = ["the dogs love cats and i love blue", "a nurse", "blue city"]
    out = metrics.bertscore(preds, refs, path, batch_size=2)
    prs = [_brute_force_pr(h, r, tok, model) for h, r in zip(preds, refs)]
    want_p = 100 * sum(p for p, _ in prs) / 3
    want_r = 100 * sum(r for _, r in prs) / 3
    want_f = 100 * sum(2 * p * r / (p + r) for p, r in prs) / 3
    assert out["bert_p"] == pytest.approx(want_p, abs=1e-3)
    assert out["bert_r"] == pytest.approx(want_r, abs=1e-3)
    assert out["bert_f1"] == pytest.approx(want_f, abs=1e-3)
    assert out["bert_f1"] < 99.0
    # The matching rule matters: with the special tokens out of the matching it scores otherwise.
    without = [_brute_force_pr(h, r, tok, model, specials_match=False) for h, r in zip(preds, refs)]
    assert abs(100 * sum(p for p, _ in without) / 3 - out["bert_p"]) > 1e-3


def test_bertscore_layer_is_the_bert_score_packages_for_the_papers_model(tiny_bert, tmp_path):
    import shutil
    from types import SimpleNamespace

    assert metrics.default_bertscore_layer("/models/deberta-xlarge-mnli", SimpleNamespace()) == 40
    named = SimpleNamespace(_name_or_path="microsoft/deberta-xlarge-mnli")
    assert metrics.default_bertscore_layer("/models/x", named) == 40
    assert metrics.default_bertscore_layer("/models/roberta", SimpleNamespace()) is None  # unknown: the last
    # A folder of that name gets layer 40 unless told otherwise (the tiny model has 2 layers).
    folder = tmp_path / "deberta-xlarge-mnli"
    shutil.copytree(tiny_bert[0], folder)
    with pytest.raises(SPTError, match="layer 40 out of range"):
        metrics.bertscore(["i love dogs"], ["i love dogs"], str(folder))
    got = metrics.bertscore(["i love dogs"], ["my dogs"], str(folder), layer=1)
    assert got == metrics.bertscore(["i love dogs"], ["my dogs"], tiny_bert[0], layer=1)


def test_paper_f1_is_case_sensitive():
    assert metrics.unigram_f1(["I Love dogs"], ["i love dogs"]) == pytest.approx(100.0)
    assert metrics.unigram_f1(["I Love dogs"], ["i love dogs"], lowercase=False) == pytest.approx(100 / 3)
    assert metrics.compute_metrics(["I Love dogs"], ["i love dogs"], paper=True)["f1"] == pytest.approx(100 / 3)


def test_bertscore_empty_reply_scores_zero(tiny_bert):
    path, _, _ = tiny_bert
    out = metrics.bertscore(["", "i love dogs"], ["i love dogs", "i love dogs"], path)
    assert out["bert_p"] == pytest.approx(50.0, abs=1e-3)  # (0 + 100) / 2


def test_bertscore_bad_path_and_layer(tmp_path, tiny_bert):
    missing = tmp_path / "no_such_model"
    with pytest.raises(SPTError, match="no_such_model"):
        metrics.bertscore(["a"], ["a"], str(missing))
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(SPTError, match="empty_folder"):
        metrics.bertscore(["a"], ["a"], str(empty))
    with pytest.raises(SPTError, match="layer 9"):
        metrics.bertscore(["a"], ["a"], tiny_bert[0], layer=9)


def test_compute_metrics_with_bertscore(tiny_bert):
    out = metrics.compute_metrics(["i love dogs"], ["i love dogs"], bertscore_model=tiny_bert[0])
    assert {"bert_p", "bert_r", "bert_f1"} <= set(out)
    assert out["bert_f1"] == pytest.approx(100.0, abs=1e-3)


# ---- plots ----------------------------------------------------------------------------------

def test_prompt_usage_fractions():
    turns = [0, 0, 0, 0, 1, 1, 3]
    chosen = [0, 0, 1, 2, 2, 2, 1]
    usage = plots.prompt_usage_by_turn(turns, chosen, num_prompts=3)
    want = np.array([
        [0.5, 0.25, 0.25],  # turn 0: 2x p0, 1x p1, 1x p2
        [0.0, 0.0, 1.0],    # turn 1: both p2
        [0.0, 0.0, 0.0],    # turn 2: unseen
        [0.0, 1.0, 0.0],
    ])
    np.testing.assert_allclose(usage, want)
    assert plots.prompt_usage_by_turn([], [], 4).shape == (0, 4)


def test_prompt_usage_errors():
    with pytest.raises(SPTError, match="chosen prompt 3"):
        plots.prompt_usage_by_turn([0], [3], num_prompts=3)
    with pytest.raises(SPTError, match="2 turn indices but 1"):
        plots.prompt_usage_by_turn([0, 1], [0], num_prompts=3)


def _assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


def test_plot_prompt_usage_writes_png(tmp_path):
    path = tmp_path / "deep" / "dir" / "usage.png"
    got = plots.plot_prompt_usage([0, 0, 1, 2, 2], [0, 1, 1, 3, 0], 4, path, title="usage")
    assert got == str(path)
    _assert_png(path)


def test_plot_loss_curves_writes_png(tmp_path):
    curves = {
        "lm": [(s, 3.0 * math.exp(-s / 50)) for s in range(0, 200, 10)],
        "sel": [(20, 0.5), (0, 0.9), (10, 0.7)],  # unsorted on purpose
        "ctr": [(5, 0.1)],
    }
    path = tmp_path / "curves" / "loss.png"
    assert plots.plot_loss_curves(curves, path) == str(path)
    _assert_png(path)
    with pytest.raises(SPTError):
        plots.plot_loss_curves({}, tmp_path / "x.png")
