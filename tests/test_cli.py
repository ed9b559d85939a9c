"""End to end through the `spt-fast` CLI on a tiny random Llama saved as a local HF folder:
train (+resume), eval with JSON, generate, export to PEFT; and every bad-input case."""
import json
from pathlib import Path

import pytest
import torch

from spt_fast import utils
from spt_fast.errors import CheckpointError
from spt_fast.training import checkpoint
from spt_fast.cli import main
from spt_fast.testing import char_tokenizer, tiny_llama

FIX = Path(__file__).parent / "fixtures"
DATA = str(FIX / "tiny_self_original.txt")


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def train_args(model_dir, out, steps=3, *extra):
    return ["train", "--model", model_dir, "--data", DATA, "--num-prompts", "3", "--prompt-len", "2",
            "--max-steps", str(steps), "--batch-size", "2", "--output-dir", str(out), "--lr", "1e-2",
            "--no-progress", *extra]


def test_train_eval_generate_export(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(train_args(model_dir, out, 3, "--eval-every", "2", "--save-every", "2"), capsys)
    assert code == 0, err
    ck = checkpoint.resolve(out)
    assert ck.name == "checkpoint-000003"
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and "val_loss" in log[1] and "val_loss" in log[2]
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["spt"]["num_prompts"] == 3 and cfg["hidden_size"] == 64

    js = tmp_path / "m.json"
    code, stdout, err = run(["eval", "--checkpoint", str(out), "--data", str(FIX / "tiny.jsonl"),
                             "--max-samples", "4", "--max-new-tokens", "4", "--json", str(js),
                             "--plot", str(tmp_path / "u.png"), "--no-progress"], capsys)
    assert code == 0, err
    metrics = json.loads(js.read_text())
    for key in ("f1", "bleu", "rouge1", "rouge2", "rougeL", "dist1", "dist2", "n"):
        assert key in metrics
    assert metrics["n"] == 4 and "DIST-1" in stdout
    assert (tmp_path / "u.png").read_bytes()[:4] == b"\x89PNG"

    code, stdout, err = run(["generate", "--checkpoint", str(out), "--persona", "i like tea .",
                             "--history", "hi !", "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    assert stdout.startswith("[prompt ")

    code, stdout, err = run(["export", "--checkpoint", str(out), "--prompt-index", "1",
                             "--output", str(tmp_path / "peft")], capsys)
    assert code == 0, err
    assert (tmp_path / "peft" / "adapter_config.json").is_file()


def test_resume_continues_to_the_same_result(model_dir, tmp_path, capsys):
    straight, split = tmp_path / "a", tmp_path / "b"
    assert run(train_args(model_dir, straight, 4), capsys)[0] == 0
    assert run(train_args(model_dir, split, 2), capsys)[0] == 0
    # More steps is a change of a setting that shapes the run: refused, then applied on request.
    code, _, err = run(train_args(model_dir, split, 4, "--resume"), capsys)
    assert code == 2 and "max_steps: 2 -> 4" in err and "--allow-changes" in err
    code, _, err = run(train_args(model_dir, split, 4, "--resume", "--allow-changes"), capsys)
    assert code == 0, err
    a, _, _ = checkpoint.load(straight)
    b, _, _ = checkpoint.load(split)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_generate_from_a_jsonl_file(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(model_dir, out, 1), capsys)[0] == 0
    rows = tmp_path / "ctx.jsonl"
    rows.write_text('{"persona": "i like tea .", "history": ["hi !"]}\n\n{"history": []}\n')
    code, stdout, err = run(["generate", "--checkpoint", str(out), "--input", str(rows),
                             "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    replies = [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]
    assert len(replies) == 2 and all(0 <= r["prompt"] < 3 and isinstance(r["reply"], str) for r in replies)

    rows.write_text('{"persona": "x"}\n{"history": ["a"]}\n')
    code, _, err = run(["generate", "--checkpoint", str(out), "--input", str(rows)], capsys)
    assert code == 2 and "ctx.jsonl:1: missing field 'history'" in err
    rows.write_text('{"history": ["a"]}\n[1, 2]\n')
    code, _, err = run(["generate", "--checkpoint", str(out), "--input", str(rows)], capsys)
    assert code == 2 and "ctx.jsonl:2: expected a JSON object" in err


@pytest.mark.parametrize("fixture,needle", [
    ("bad_no_number.txt", "bad_no_number.txt:"),
    ("bad_no_tab.txt", "bad_no_tab.txt:"),
    ("bad_missing_response.jsonl", "response"),
    ("empty.txt", "empty.txt"),
])
def test_bad_data_is_one_clear_message(model_dir, tmp_path, capsys, fixture, needle):
    args = train_args(model_dir, tmp_path / "x", 1)
    args[args.index(DATA)] = str(FIX / fixture)
    code, _, err = run(args, capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_k_and_model_folder(model_dir, tmp_path, capsys):
    args = train_args(model_dir, tmp_path / "x", 1)
    args[args.index("--num-prompts") + 1] = "0"
    code, _, err = run(args, capsys)
    assert code == 2 and "num_prompts" in err
    args = train_args(str(tmp_path / "nowhere"), tmp_path / "x", 1)
    code, _, err = run(args, capsys)
    assert code == 2 and "nowhere" in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    code, _, err = run(train_args(str(tmp_path / "broken"), tmp_path / "x", 1), capsys)
    assert code == 2 and "broken" in err


def test_checkpoint_from_a_different_width_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(model_dir, out, 1), capsys)[0] == 0
    wide = tmp_path / "wide"
    tiny_llama(hidden=32, heads=2, kv_heads=1).save_pretrained(wide)
    char_tokenizer().save_pretrained(wide)
    code, _, err = run(["generate", "--checkpoint", str(out), "--model", str(wide), "--history", "hi"], capsys)
    assert code == 2 and "width" in err


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = run(["eval", "--checkpoint", str(tmp_path / "none"), "--data", DATA], capsys)
    assert code == 2 and "none" in err


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    t = {"prompts": torch.ones(2, 2, 4), "retriever.weight": torch.eye(4), "retriever.bias": torch.zeros(4)}
    checkpoint.save(tmp_path, 1, t, {"step": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(utils, "save_file", boom)  # the one safetensors writer (spt_fast.utils)
    # A failed write is one line naming the checkpoint and the cause (not a raw OSError).
    with pytest.raises(CheckpointError, match=r"checkpoint-000002: cannot write the checkpoint \(disk full\)"):
        checkpoint.save(tmp_path, 2, {k: v * 2 for k, v in t.items()}, {"step": 2})
    tensors, cfg, folder = checkpoint.load(tmp_path)
    assert folder.name == "checkpoint-000001" and cfg["step"] == 1
    torch.testing.assert_close(tensors["prompts"], t["prompts"])
    assert not list(tmp_path.glob(".checkpoint-*"))  # no half-written leftovers
