"""The quality study end to end on a tiny random Llama: every run and seed, the report files, reuse of
finished runs, resuming an unfinished one from its checkpoint, and refusing mismatched settings."""
import json
import math
from pathlib import Path

import pytest

from spt_fast.evaluation import study
from spt_fast.cli import main

DATA = str(Path(__file__).parent / "fixtures" / "tiny_self_original.txt")


def study_args(model_dir, out, *extra):
    return ["study", "--output-dir", str(out), "--model", model_dir, "--data", DATA, "--steps", "2",
            "--seeds", "0", "1", "--num-prompts", "3", "--prompt-len", "2", "--max-len", "256",
            "--eval-samples", "3", "--val-samples", "3", "--max-new-tokens", "3", "--no-progress", *extra]


def test_study_runs_reports_and_resumes(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    assert main(study_args(model_dir, out)) == 0
    rows = json.loads((out / "results.json").read_text())
    specs = study.run_specs(3)
    # Every run for every seed, but the old shared placement only once (the first seed).
    assert sorted((r["run"], r["seed"]) for r in rows) == sorted(
        (n, s) for n in specs for s in (0, 1) if specs[n].every_seed or s == 0)
    assert {r["layout"] for r in rows if r["run"] == "spt-shared-old"} == {"shared-old"}
    for r in rows:
        layout, K, losses = specs[r["run"]].layout, specs[r["run"]].K, specs[r["run"]].losses
        assert (r["layout"], r["K"], r["losses"], r["steps"]) == (layout, K, ["lm", *losses], 2)
        for key in ("f1", "bleu", "rouge1", "rouge2", "rougeL", "dist1", "dist2", "val_loss", "usage_entropy",
                    "first_token_ce", "later_token_ce", "empty", "val_random_loss", "val_oracle_loss",
                    "pick_best_rate"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["run"], key)
        assert 0.0 <= r["usage_entropy"] <= math.log(K) + 1e-9
        assert r["val_oracle_loss"] <= r["val_loss"] + 1e-9 and r["val_oracle_loss"] <= r["val_random_loss"] + 1e-9
        assert 0.0 <= r["empty"] <= 100.0
        if K == 1:
            assert r["usage_entropy"] == 0.0 and r["val_loss"] == pytest.approx(r["val_random_loss"])
    assert "sel" not in next(r for r in rows if r["run"] == "spt-shared-no-sel")["losses"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["runs"]["spt-shared"]["f1"]["n"] == 2
    for png in ("loss_curves.png", "metrics.png", "usage_spt-prefix.png", "usage_spt-shared.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    report = (out / "results.md").read_text()
    assert "spt-shared-no-ctr" in report and "pt-prefix seed 1:" in report

    # Finished runs are reused as they are: nothing is trained again.
    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    with monkeypatch.context() as m:
        m.setattr(study, "Trainer", no_training)
        assert main(study_args(model_dir, out)) == 0
    assert json.loads((out / "results.json").read_text()) == rows

    # A result written before the first-token statistics existed gets them from its checkpoint.
    r0 = out / "runs" / "spt-prefix-seed0" / "result.json"
    full = json.loads(r0.read_text())
    r0.write_text(json.dumps({k: v for k, v in full.items() if not k.startswith("first_token")
                              and k != "later_token_ce"}))
    assert main(study_args(model_dir, out, "--runs", "spt-prefix", "--seeds", "0")) == 0
    again = json.loads(r0.read_text())
    assert again["first_token_ce"] == pytest.approx(full["first_token_ce"], rel=1e-5)
    assert again["later_token_ce"] == pytest.approx(full["later_token_ce"], rel=1e-5)

    # An interrupted run (checkpoints written, no result yet) resumes from its checkpoint and, with
    # the same weights, scores exactly as before.
    done = out / "runs" / "spt-shared-seed1" / "result.json"
    before = json.loads(done.read_text())
    done.unlink()
    assert main(study_args(model_dir, out, "--runs", "spt-shared", "--seeds", "1")) == 0
    after = json.loads(done.read_text())
    for key in ("f1", "bleu", "rougeL", "dist1", "val_loss", "usage_entropy", "first_token_ce", "picks"):
        assert after[key] == before[key], key
    assert [p["step"] for p in after["curve"]] == [1, 2]

    # Other settings in the same folder: a clear refusal instead of mixing budgets.
    capsys.readouterr()
    assert main(study_args(model_dir, out, "--steps", "3")) == 2
    assert "other settings" in capsys.readouterr().err


def test_unknown_run_is_named(model_dir, tmp_path, capsys):
    code = main(study_args(model_dir, tmp_path / "s", "--runs", "spt-sideways"))
    assert code == 2 and "spt-sideways" in capsys.readouterr().err


def test_aggregate_mean_and_spread():
    rows = [{"run": "a", "f1": 1.0, "val_loss": 2.0}, {"run": "a", "f1": 3.0, "val_loss": 2.0},
            {"run": "b", "f1": 5.0}]
    agg = study.aggregate(rows)
    assert agg["a"]["f1"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2.0)), "n": 2}
    assert agg["a"]["val_loss"]["std"] == 0.0
    assert agg["b"]["f1"] == {"mean": 5.0, "std": 0.0, "n": 1} and "val_loss" not in agg["b"]


def test_usage_entropy():
    assert study.usage_entropy([0, 1, 2, 3], 4) == pytest.approx(math.log(4))
    assert study.usage_entropy([2, 2, 2], 4) == 0.0
    assert study.usage_entropy([], 4) == 0.0


def test_settings_name_the_later_fields_only_where_they_differ_from_before():
    # A run finished before route / lambda_sel / lambda_ctr existed used 0 / 0.4 / 0.4: a study at
    # those values reuses it, a study at any other value does not.
    before = study.StudyConfig(route=0.0, lambda_sel=0.4, lambda_ctr=0.4).settings()
    assert not {"route", "lambda_sel", "lambda_ctr"} & set(before)
    now = study.StudyConfig().settings()
    assert (now["route"], now["lambda_ctr"]) == (1.0, 1.0) and "lambda_sel" not in now
    assert study.StudyConfig(route=0.5).settings()["route"] == 0.5


def test_a_change_to_the_retriever_alone_keeps_the_pt_runs():
    # One prompt, no retriever: its settings cannot change a PT run, which a study that changes
    # only them reuses; an SPT run is retrained.
    before, now = study.StudyConfig(balance_rate=0.0, key_grad=True), study.StudyConfig(balance_rate=0.02)
    assert before.run_settings(1) == now.run_settings(1)
    assert before.run_settings(4) != now.run_settings(4)
    assert study.StudyConfig(lr=1e-2).run_settings(1) != now.run_settings(1)


def test_study_jobs_share_the_runs_between_processes(model_dir, tmp_path, capfd):
    runs = ("--runs", "pt-shared", "spt-shared", "--seeds", "0")
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert main(study_args(model_dir, serial, *runs)) == 0
    capfd.readouterr()
    assert main(study_args(model_dir, parallel, *runs, "--jobs", "2")) == 0
    out = capfd.readouterr().out
    # The workers trained both runs; the main pass only gathered them.
    assert "2 worker processes" in out and out.count("done earlier, reusing") == 2
    a = {r["run"]: r for r in json.loads((serial / "results.json").read_text())}
    b = {r["run"]: r for r in json.loads((parallel / "results.json").read_text())}
    assert sorted(b) == ["pt-shared", "spt-shared"]
    for run in a:  # one thread instead of all: the same training up to float rounding
        assert b[run]["val_loss"] == pytest.approx(a[run]["val_loss"], rel=1e-4), run
        assert b[run]["steps"] == a[run]["steps"] == 2


def test_a_claimed_run_is_skipped_by_a_worker_and_refused_by_the_main_pass(tmp_path):
    from spt_fast.errors import SPTError

    folder = tmp_path / "runs" / "spt-shared-seed0"
    held = study.claim(folder)  # as another process would hold it (a second open file conflicts too)
    assert held is not None and study.claim(folder) is None
    sc = study.StudyConfig(output_dir=str(tmp_path))
    spec = study.run_specs(2)["spt-shared"]
    assert study.run_claimed(sc, "spt-shared", spec, 0, (), skip_claimed=True) is None
    with pytest.raises(SPTError, match="another study process is training this run"):
        study.run_claimed(sc, "spt-shared", spec, 0, ())
    held.close()  # released (as when its process ends): free again
    again = study.claim(folder)
    assert again is not None
    again.close()


def test_jobs_must_be_positive(model_dir, tmp_path, capsys):
    assert main(study_args(model_dir, tmp_path / "s", "--jobs", "0")) == 2
    assert "--jobs" in capsys.readouterr().err
