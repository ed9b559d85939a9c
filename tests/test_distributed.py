"""Data-parallel training: two processes started by torch's own launcher (torchrun, gloo on the
CPU) train exactly what one process trains with the same global batch, in both layouts with all
four losses; only process 0 writes; a run resumes on another world size; a dead process ends the
other with a clear message instead of a hang. Every process is bounded in time."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spt_fast.training import checkpoint

DATA = str(Path(__file__).parent / "fixtures" / "tiny_self_original.txt")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "TQDM_DISABLE": "1"}


def train_flags(model_dir, out, steps, batch, layout, *extra):
    # --tau-gold 1: at the default 0.03 the selection target amplifies fp32 rounding (which differs
    # with the order a reduction adds in) 33 times, and Adam's first steps turn that into visibly
    # different updates of near-zero gradients; what is tested here is the reduction itself.
    return ["train", "--tau-gold", "1", "--model", model_dir, "--data", DATA, "--output-dir", str(out), "--max-steps", str(steps),
            "--batch-size", str(batch), "-K", "3", "-L", "2", "--layout", layout, "--max-len", "256",
            "--lr", "0.02", "--retriever-lr", "0.02", "--init", "random", "--eval-samples", "2",
            "--dist-timeout", "60", "--no-progress", *extra]


def one_process(argv, timeout=240):
    proc = subprocess.run([sys.executable, "-m", "spt_fast", *argv], capture_output=True, text=True, env=ENV,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def torchrun(argv, nproc=2, timeout=240, check=True):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "spt_fast", *argv], capture_output=True, text=True, env=ENV,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def trained(out):
    return checkpoint.load(out)[0]


def assert_same(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", ["shared", "prefix"])
def test_two_processes_train_what_one_process_trains(model_dir, tmp_path, layout):
    single, double = tmp_path / "single", tmp_path / "double"
    one_process(train_flags(model_dir, single, 3, 4, layout))
    proc = torchrun(train_flags(model_dir, double, 3, 2, layout))
    assert_same(trained(single), trained(double))
    # Process 0 alone wrote: one log line per step, one config naming the world size.
    assert [json.loads(line)["step"] for line in (double / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert checkpoint.load(double)[1]["world_size"] == 2
    assert proc.stdout.count("trained 3 steps") == 1
    log1 = [json.loads(line) for line in (single / "train_log.jsonl").read_text().splitlines()]
    log2 = [json.loads(line) for line in (double / "train_log.jsonl").read_text().splitlines()]
    for a, b in zip(log1, log2):  # the logged losses are the global batch's, not one process's
        for key in ("loss", "lm", "sel", "fus", "ctr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_resume_on_another_world_size(model_dir, tmp_path):
    straight, a, b = tmp_path / "straight", tmp_path / "a", tmp_path / "b"
    one_process(train_flags(model_dir, straight, 4, 4, "shared"))
    torchrun(train_flags(model_dir, a, 2, 2, "shared"))  # 2 processes x 2 ...
    one_process(train_flags(model_dir, a, 4, 4, "shared", "--resume", "--allow-changes"))  # ... then 1 x 4
    assert_same(trained(straight), trained(a))
    one_process(train_flags(model_dir, b, 2, 4, "shared"))  # 1 x 4 ...
    torchrun(train_flags(model_dir, b, 4, 2, "shared", "--resume", "--allow-changes"))  # ... then 2 x 2
    assert_same(trained(straight), trained(b))
    # A different global batch is another run: refused.
    proc = torchrun(train_flags(model_dir, b, 5, 4, "shared", "--resume", "--allow-changes"), check=False)
    assert proc.returncode != 0 and "global_batch: 4 -> 8" in proc.stderr


def test_a_dead_process_ends_the_other_with_a_message(model_dir, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "spt_fast",
            *train_flags(model_dir, out, 100000, 2, "shared", "--save-minutes", "0")]
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 180
        while not (out / "train_log.jsonl").exists() or not (out / "train_log.jsonl").read_text().strip():
            assert time.time() < deadline and launcher.poll() is None, "training did not start"
            time.sleep(0.5)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        assert len(workers) == 2, workers
        victim = max(workers)
        os.kill(victim, signal.SIGKILL)
        t0 = time.time()
        stdout, stderr = launcher.communicate(timeout=120)
        assert time.time() - t0 < 120
        assert launcher.returncode != 0
        assert "another rank stopped or did not answer" in stderr or "SIGTERM at step" in stderr, stderr[-3000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)


def test_bench_train_has_a_row_per_world_size(tmp_path):
    """`spt-fast bench train --world-size 2` runs prefix and shared in two torchrun processes beside
    the one-process rows (the straightforward baseline only in one), and compares them."""
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "spt_fast", "bench", "train", "--model", "preset:tiny",
                           "--context-len", "16", "--response-len", "4", "--max-len", "64", "--steps", "1",
                           "--min-seconds", "0.5", "--world-size", "1", "--world-size", "2", "--json", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    got = sorted((r["impl"], r["world"]) for r in rows)
    assert got == [("prefix", 1), ("prefix", 2), ("shared", 1), ("shared", 2), ("straightforward", 1)]
    assert all("error" not in r and r["samples_per_s"] > 0 for r in rows), [r.get("error") for r in rows]
    assert all(r["speedup_vs_one_process"] > 0 for r in rows if r["world"] == 2)
    # Passes repeat until 0.5 s have passed, the torchrun processes deciding together (else a hang).
    assert all(r["passes"] >= 1 for r in rows) and max(r["passes"] for r in rows) > 1
    # In one process the fast impls are timed before and after the baseline, the windows merged.
    windows = {(r["impl"], r["world"]): r["windows"] for r in rows}
    assert windows == {("straightforward", 1): 1, ("prefix", 1): 2, ("shared", 1): 2, ("prefix", 2): 1,
                       ("shared", 2): 1}
    for r in rows:
        assert r["seconds"] >= 0.5 * r["windows"]


def test_bench_train_merges_two_windows_by_their_time():
    from spt_fast.benchmarks.train import _merge

    a = {"impl": "shared", "passes": 3, "windows": 1, "seconds": 20.0, "samples_per_s": 0.9, "tokens_per_s": 400.0,
         "peak_mem_bytes": 100}
    b = {**a, "passes": 2, "seconds": 30.0, "samples_per_s": 0.4, "tokens_per_s": 180.0, "peak_mem_bytes": 120}
    m = _merge(a, b)
    assert m["samples_per_s"] == (0.9 * 20 + 0.4 * 30) / 50 and m["tokens_per_s"] == (400 * 20 + 180 * 30) / 50
    assert (m["passes"], m["windows"], m["seconds"], m["peak_mem_bytes"]) == (5, 2, 50.0, 120)
    assert _merge(a, {"impl": "shared", "error": "boom"})["error"] == "boom"
