"""Paper fidelity: the paper's configurations by name, the authors' options (noise on the selection
target, N(0, 1) prompt init), and their evaluation (cuts at any ':', __SILENCE__ kept)."""
import json
import math
from pathlib import Path

import pytest
import torch

from spt_fast.cli import build_parser, main
from spt_fast.cli.train import given_fields, spt_config, train_config, with_preset
from spt_fast.data.corpora import load_convai2
from spt_fast.model import losses
from spt_fast.model.prompts import SoftPrompts
from spt_fast.training.presets import PRESETS, describe

FIX = Path(__file__).parent / "fixtures"


def configs(argv):
    a = build_parser().parse_args(argv)
    a.argv = argv
    return with_preset(a.preset, given_fields(a), spt_config(a), train_config(a))


def test_presets_set_the_papers_settings_and_flags_override_them():
    spt, tc = configs(["train", "--preset", "opt-2.7b"])
    assert (spt.num_prompts, spt.prompt_len, spt.lambda_sel, spt.lambda_ctr) == (4, 8, 0.4, 0.4)
    assert (spt.init, spt.retriever, spt.max_len, spt.target_noise, spt.tau_gold, spt.route) == \
        ("normal", "paper", 512, 0.0, 1.0, 0.0)
    assert (tc.lr, tc.retriever_lr, tc.batch_size, tc.epochs) == (1e-4, None, 2, 1.0)
    spt, tc = configs(["train", "--preset", "llama2-7b-noise", "-K", "2", "--lr", "3e-4"])
    assert (spt.num_prompts, spt.prompt_len, spt.lambda_sel, spt.target_noise) == (2, 1, 1.0, 0.1)
    assert tc.lr == 3e-4
    spt, _ = configs(["train", "--preset", "opt-125m-pt"])
    assert (spt.num_prompts, spt.use_sel, spt.use_fus, spt.use_ctr, spt.prompt_len) == (1, False, False, False, 8)
    assert set(PRESETS) >= {"opt-125m", "opt-1.3b", "opt-2.7b", "llama2-7b", "llama2-7b-noise",
                            "opt-125m-pt", "llama2-7b-pt"}
    assert "llama2-7b (meta-llama/Llama-2-7b-chat-hf): K=4, L=1, lambda=1.0" in describe()


def test_epochs_set_the_steps(model_dir, tmp_path, capsys):
    from spt_fast.training.trainer import TrainConfig, load_splits

    data = str(FIX / "tiny_self_original.txt")
    out = tmp_path / "run"
    code = main(["train", "--model", model_dir, "--data", data, "--output-dir", str(out), "--epochs", "1",
                 "--batch-size", "2", "-K", "2", "-L", "2", "--max-len", "256", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    n_train = len(load_splits(TrainConfig(data=data))[0])
    assert len((out / "train_log.jsonl").read_text().splitlines()) == math.ceil(n_train / 2)


def test_target_noise_keeps_the_selection_loss_finite():
    torch.manual_seed(0)
    ce = torch.tensor([[1.0, 2.0, 3.0], [1.05, 0.5, 3.0]])  # [K, B]
    scores = torch.rand(3, 2, requires_grad=True)
    clean = losses.selection_loss(ce, scores)
    noisy = [losses.selection_loss(ce, scores, target_noise=0.3) for _ in range(50)]
    assert all(torch.isfinite(x) for x in noisy)  # the authors' unnormalised target would give NaN here
    assert any(abs(float(x - clean)) > 1e-4 for x in noisy)
    torch.autograd.grad(noisy[0], scores)
    assert losses.selection_loss(ce, scores, target_noise=0.0) == clean


def test_normal_init_is_n01():
    emb = torch.randn(1000, 64) * 0.02
    p = SoftPrompts(4, 8, emb, init="normal", seed=1).weight
    assert 0.9 < float(p.std()) < 1.1 and abs(float(p.mean())) < 0.1


def test_silence_kept_for_the_paper_evaluation(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("1 your persona: i sing .\n2 __SILENCE__\thi there !\n3 hello\thow are you ?\n")
    assert load_convai2(f)[1].history == ("hi there !", "hello")
    assert load_convai2(f, keep_silence=True)[1].history == ("__SILENCE__", "hi there !", "hello")


def test_paper_metrics_cut_at_any_colon(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    data = str(FIX / "tiny_self_original.txt")
    assert main(["train", "--model", model_dir, "--data", data, "--output-dir", str(out), "--max-steps", "1",
                 "-K", "2", "-L", "2", "--max-len", "256", "--no-progress"]) == 0
    for flags in ([], ["--paper-metrics"]):
        preds = tmp_path / f"p{len(flags)}.jsonl"
        code = main(["eval", "--checkpoint", str(out), "--data", data, "--max-new-tokens", "24",
                     "--predictions", str(preds), "--no-progress", *flags])
        assert code == 0, capsys.readouterr().err
        replies = [json.loads(line)["prediction"] for line in preds.read_text().splitlines()]
        assert len(replies) == len(load_convai2(data, keep_silence=bool(flags)))  # the whole file by default
        if flags:
            assert not any(":" in r or "\n" in r for r in replies)
        else:
            assert not any("Q:" in r or "R:" in r or "\n" in r for r in replies)
    capsys.readouterr()


@pytest.mark.parametrize("flag, value", [("--target-noise", "-1"), ("--tau-gold", "0"), ("--lambda-sel", "nan")])
def test_bad_method_settings_are_named(model_dir, tmp_path, capsys, flag, value):
    code = main(["train", "--model", model_dir, "--data", str(FIX / "tiny_self_original.txt"), "--output-dir",
                 str(tmp_path / "r"), flag, value, "--no-progress"])
    assert code == 2 and flag in capsys.readouterr().err
