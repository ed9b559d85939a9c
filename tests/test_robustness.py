"""Runs that never lose work and never lie: faults injected into real training processes, resume
rules, output folders, unsafe or damaged checkpoints, portable checkpoints, early checks of output
paths, truncation that is reported, and one-line errors for bad input."""
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spt_fast.cli import main

from spt_fast.training import checkpoint

HERE = Path(__file__).parent
DATA = str(HERE / "fixtures" / "tiny_self_original.txt")
DRIVER = str(HERE / "train_driver.py")


def drive(model_dir, out, *extra, expect=0):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, DRIVER, model_dir, DATA, str(out), *extra], capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == expect, (extra, proc.returncode, proc.stderr[-3000:])
    return proc


def leftovers(out: Path) -> list[str]:
    """Temporary files or folders anywhere in a run folder."""
    return [str(p) for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / checkpoint.LOG).read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    drive(model_dir, out)
    return checkpoint.load(out)[0]


def test_kills_at_every_moment_then_resume_end_bit_identical(model_dir, tmp_path, straight):
    out = tmp_path / "run"
    kill = -signal.SIGKILL
    drive(model_dir, out, "--fault", "step:2", expect=kill)  # mid-step 2 (step 1 saved)
    assert leftovers(out) == [] and logged_steps(out) == [1]
    drive(model_dir, out, "--resume", "--fault", "save:2", expect=kill)  # mid-save of the 2nd save here
    assert leftovers(out)  # the half-written checkpoint folder is still there ...
    drive(model_dir, out, "--resume", "--fault", "latest:2", expect=kill)  # ... and gone after this start
    drive(model_dir, out, "--resume", "--fault", "step:1", expect=kill)
    drive(model_dir, out, "--resume")
    assert leftovers(out) == []
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]
    got, config, _ = checkpoint.load(out)
    assert config["step"] == 6
    assert straight["retriever.pick_bias"].abs().max() > 0  # the training state a resume must restore
    for name, tensor in straight.items():
        assert torch.equal(got[name], tensor), name


def test_sigint_saves_then_resume_ends_bit_identical(model_dir, tmp_path, straight):
    out = tmp_path / "run"
    proc = drive(model_dir, out, "--fault", "sigint:3", expect=130)
    assert "SIGINT at step 3" in proc.stdout and "--resume" in proc.stdout
    _, config, folder = checkpoint.load(out)
    assert config["step"] == 3 and folder.name == "checkpoint-000003"
    assert logged_steps(out) == [1, 2, 3]
    drive(model_dir, out, "--resume")
    got, _, _ = checkpoint.load(out)
    for name, tensor in straight.items():
        assert torch.equal(got[name], tensor), name
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6] and leftovers(out) == []


def train_args(model_dir, out, steps, *extra):
    return ["train", "--model", model_dir, "--data", DATA, "--output-dir", str(out), "--max-steps", str(steps),
            "--num-prompts", "2", "--prompt-len", "2", "--max-len", "256", "--batch-size", "2",
            "--eval-samples", "2", "--no-progress", *extra]


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_checkpoints_by_default_and_every_n_steps(model_dir, tmp_path, capsys):
    from spt_fast.training.trainer import TrainConfig

    assert TrainConfig().save_minutes > 0  # periodic checkpoints without asking for them
    out = tmp_path / "run"
    assert run(train_args(model_dir, out, 3, "--save-every", "1"), capsys)[0] == 0
    # keep=2: the newest two survive; each was a complete checkpoint when written
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]


def test_resume_refuses_changed_settings_and_applies_safe_ones_on_request(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(model_dir, out, 2, "--lr", "0.01", "--layout", "shared"), capsys)[0] == 0
    for flags, listed in [(["--seed", "3"], "seed: 0 -> 3"), (["--batch-size", "1"], "global_batch: 2 -> 1"),
                          (["--layout", "prefix"], "spt.layout: 'shared' -> 'prefix'"),
                          (["--max-len", "200"], "spt.max_len: 256 -> 200")]:
        code, _, err = run(train_args(model_dir, out, 2, "--resume", *flags), capsys)
        assert code == 2 and "refuses changed settings" in err and listed in err, err
        code, _, err = run(train_args(model_dir, out, 2, "--resume", "--allow-changes", *flags), capsys)
        assert code == 2 and listed in err  # unsafe: never applied
    code, _, err = run(train_args(model_dir, out, 3, "--resume", "--lr", "0.02"), capsys)
    assert code == 2 and "lr: 0.01 -> 0.02" in err and "max_steps: 2 -> 3" in err and "--allow-changes" in err
    code, stdout, err = run(train_args(model_dir, out, 3, "--resume", "--lr", "0.02", "--allow-changes"), capsys)
    assert code == 0, err
    _, config, _ = checkpoint.load(out)
    assert config["train"]["lr"] == 0.02 and config["train"]["max_steps"] == 3 and config["step"] == 3
    # Flags left out on a resume are the run's own, not the defaults.
    code, _, err = run(["train", "--model", model_dir, "--data", DATA, "--output-dir", str(out), "--resume",
                        "--no-progress"], capsys)
    assert code == 0, err
    assert checkpoint.load(out)[1]["spt"]["num_prompts"] == 2


def test_output_folder_with_a_run_is_refused_or_overwritten(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(model_dir, out, 1), capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    code, _, err = run(train_args(model_dir, out, 1), capsys)
    assert code == 2 and "already holds a training run" in err and "--overwrite" in err
    assert logged_steps(out) == [1]
    code, stdout, err = run(train_args(model_dir, out, 2, "--overwrite"), capsys)
    assert code == 0, err
    assert logged_steps(out) == [1, 2] and (out / "notes.txt").read_text() == "mine"


def test_stale_temporaries_are_cleaned_on_start(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(model_dir, out, 1), capsys)[0] == 0
    (out / ".checkpoint-000002.abc").mkdir()
    (out / ".checkpoint-000002.abc" / "spt.safetensors").write_bytes(b"half")
    (out / ".latest.xyz.tmp").write_text("checkpoint-0")
    assert run(train_args(model_dir, out, 2, "--resume", "--allow-changes"), capsys)[0] == 0
    assert leftovers(out) == []


def test_a_planted_pickle_is_never_loaded(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(model_dir, out, 1), capsys)[0] == 0
    _, _, folder = checkpoint.load(out)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in (checkpoint.STATE_TENSORS, checkpoint.STATE_JSON):
        (folder / name).unlink()
    (folder / checkpoint.PICKLED_STATE).write_bytes(pickle.dumps(Payload()))
    code, _, err = run(train_args(model_dir, out, 2, "--resume", "--allow-changes"), capsys)
    assert code == 2 and "never loaded" in err and "pickle" in err
    assert not marker.exists()
    # Nothing in the project's source unpickles: no torch.load, no pickle.load.
    src = Path(checkpoint.__file__).resolve().parents[1]
    for path in list(src.rglob("*.py")) + list((src.parent / "kernels").glob("*.py")):
        text = path.read_text()
        assert "torch.load(" not in text and "pickle.load" not in text, path


def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(model_dir, out, 2, "--save-every", "1"), capsys)[0] == 0
    (out / "checkpoint-000002" / checkpoint.TENSORS).write_bytes(b"\x00garbage")
    code, _, err = run(train_args(model_dir, out, 3, "--resume", "--allow-changes"), capsys)
    assert code == 0, err
    assert "checkpoint-000002 is damaged" in err and "using" in err and "checkpoint-000001" in err
    assert logged_steps(out) == [1, 2, 3] and checkpoint.load(out)[1]["step"] == 3


def test_checkpoints_are_portable_and_a_missing_base_says_how_to_point_at_it(model_dir, tmp_path, capsys):
    import shutil

    moved = tmp_path / "model"
    shutil.copytree(model_dir, moved)
    out = tmp_path / "run"
    assert run(train_args(str(moved), out, 1), capsys)[0] == 0
    assert checkpoint.load(out)[1]["model"] == str(moved)  # as given, never a cache path
    shutil.rmtree(moved)
    code, _, err = run(["generate", "--checkpoint", str(out), "--history", "hi"], capsys)
    assert code == 2 and "--model PATH" in err and str(moved) in err
    code, stdout, err = run(["generate", "--checkpoint", str(out), "--history", "hi", "--model", model_dir,
                             "--max-new-tokens", "2"], capsys)
    assert code == 0, err


def test_export_names_the_default_model_portably(tmp_path):
    from spt_fast.model.loading import DEFAULT_HUB_NAME
    from spt_fast.training.export import export_peft

    t = {"prompts": torch.ones(2, 2, 4), "retriever.weight": torch.eye(4), "retriever.bias": torch.zeros(4)}
    checkpoint.save(tmp_path / "run", 1, t, {"model": "default", "spt": {"layout": "prefix"}})
    out = export_peft(str(tmp_path / "run"), 0, str(tmp_path / "peft"))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == DEFAULT_HUB_NAME


def test_output_paths_are_checked_before_any_work(model_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
        ro = tmp_path / "a-file"
        ro.write_text("")
    code, _, err = run(train_args(model_dir, ro / "run", 1), capsys)
    assert code == 2 and f"--output-dir {ro / 'run'}: cannot write" in err
    assert "Loading" not in err  # refused before the model was loaded
    out = tmp_path / "run"
    assert run(train_args(model_dir, out, 1), capsys)[0] == 0
    code, stdout, err = run(["eval", "--checkpoint", str(out), "--data", DATA, "--json", str(ro / "m.json"),
                             "--no-progress"], capsys)
    assert code == 2 and f"--json {ro / 'm.json'}: cannot write" in err and "F1" not in stdout


@pytest.mark.parametrize("argv, words", [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--retriever-lr", "-0.1"], "--retriever-lr must be a finite number > 0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--save-minutes", "inf"], "--save-minutes must be a finite number >= 0"),
])
def test_bad_train_flags_are_one_line_errors(model_dir, tmp_path, capsys, argv, words):
    code, _, err = run(train_args(model_dir, tmp_path / "run", 1) + argv, capsys)
    assert code == 2 and words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_generate_input_and_bad_bytes_and_bad_checkpoints(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(model_dir, out, 1), capsys)[0] == 0
    for flags, words in [(["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
                         (["--batch-size", "0"], "--batch-size must be an integer >= 1")]:
        code, _, err = run(["generate", "--checkpoint", str(out), "--history", "hi", *flags], capsys)
        assert code == 2 and words in err
    bad = os.fsdecode(b"\xff\xfe-persona")
    code, _, err = run(["generate", "--checkpoint", str(out), "--persona", bad, "--history", "hi"], capsys)
    assert code == 2 and "argument 5" in err and "the value of --persona" in err and "not valid UTF-8" in err
    tensors, config, folder = checkpoint.load(out)
    tensors["prompts"][0, 0, 0] = float("nan")
    checkpoint.save(tmp_path / "nan", 1, tensors, config)
    code, _, err = run(["generate", "--checkpoint", str(tmp_path / "nan"), "--history", "hi"], capsys)
    assert code == 2 and "'prompts' holds NaN or infinite values" in err
    # The position budget is the engine's: a huge history is cut to max_len, not decoded for minutes.
    code, stdout, err = run(["generate", "--checkpoint", str(out), "--history", "word " * 5000,
                             "--max-new-tokens", "2"], capsys)
    assert code == 0, err


def test_an_over_long_utterance_is_cut_counted_and_reported(char_tok):
    from spt_fast.data.corpora import Sample
    from spt_fast.data.text import Encoder
    from spt_fast.generation.engine import Engine
    from spt_fast.model.build import build_spt_model
    from spt_fast.model.spt import SPTConfig
    from spt_fast.testing import tiny_llama

    enc = Encoder(char_tok, 120, 4)
    long = " ".join(f"w{i}" for i in range(200))
    e = enc.encode(Sample(("i sing.",), ("hello", "hi there", long), "ok", "d", 1))
    assert e is not None and e.cut and e.truncated and enc.n_cut == 1 and enc.n_skipped == 0
    text = char_tok.decode(e.context_ids, skip_special_tokens=True)
    assert text.endswith(" w199 R:") and " Q: " in text and "w0 " not in text  # the end of it survives
    assert len(e.context_ids) + 4 + len(e.response_ids) <= 120
    short = enc.encode(Sample(("i sing.",), ("hello",), "ok", "d", 0))
    assert not short.truncated
    spt = build_spt_model(tiny_llama(), SPTConfig(num_prompts=2, prompt_len=4, max_len=120, layout="shared"))
    replies = Engine(spt, char_tok).generate([(["i sing."], ["hello", long]), (["i sing."], ["hello"])],
                                             max_new_tokens=2)
    assert [r.truncated for r in replies] == [True, False]


def test_the_kernels_probe_warning_is_silenced_and_nothing_else():
    import spt_fast  # noqa: F401  (installs the filter)

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    try:
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'")
        log.warning("something else went wrong")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something else went wrong"]


def test_help_shows_each_default_once():
    from spt_fast.cli import COMMANDS, build_parser

    parser = build_parser()
    for cmd in COMMANDS:
        sub = [cmd, "generate"] if cmd == "bench" else [cmd]
        with pytest.raises(SystemExit):
            parser.parse_args([*sub, "--help"])
    import contextlib
    import io

    for cmd in ("train", "eval", "generate", "chat", "demo", "study"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        text = " ".join(buf.getvalue().split())
        for chunk in text.split(" --")[1:]:
            assert chunk.count("(default") <= 1, (cmd, chunk)
            assert "(default: None)" not in chunk and "(default: False)" not in chunk, (cmd, chunk)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    assert "(default: 0.0001)" in " ".join(buf.getvalue().split())  # --lr
