"""A training run in its own process, for the fault-injection tests (tests/test_robustness.py).

    python train_driver.py MODEL_DIR DATA OUT [--resume] [--fault KIND:N]

KIND:N makes the process hurt itself the N-th time it reaches a point:
  step:N    SIGKILL in the middle of training step N (its batch drawn, no optimizer step yet)
  save:N    SIGKILL in the middle of the N-th checkpoint save (tensors written, folder not renamed)
  latest:N  SIGKILL after the N-th checkpoint folder was renamed into place, before `latest` moved
  sigint:N  SIGINT during step N (the trainer saves after that step and stops)
"""
import argparse
import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from spt_fast.model.spt import SPTConfig  # noqa: E402
from spt_fast.training import checkpoint  # noqa: E402
from spt_fast.training.trainer import TrainConfig, Trainer, TrainingInterrupted  # noqa: E402

STEPS = 6


def hurt_at(kind: str, n: int) -> None:
    seen = {"count": 0}

    def hit():
        seen["count"] += 1
        if seen["count"] == n:
            os.kill(os.getpid(), signal.SIGINT if kind == "sigint" else signal.SIGKILL)

    if kind in ("step", "sigint"):
        draw = Trainer._next_encoded

        def drawing(self, k):
            got = draw(self, k)
            hit()
            return got
        Trainer._next_encoded = drawing
    elif kind == "save":
        write = checkpoint.save_tensors_atomic

        def writing(path, tensors, *a, **kw):
            out = write(path, tensors, *a, **kw)
            if path.name == checkpoint.TENSORS:
                hit()
            return out
        checkpoint.save_tensors_atomic = writing
    elif kind == "latest":
        write = checkpoint.write_text_atomic

        def pointing(path, text):
            if path.name == checkpoint.LATEST:
                hit()
            return write(path, text)
        checkpoint.write_text_atomic = pointing
    else:
        raise SystemExit(f"unknown fault {kind}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--fault", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)  # the same arithmetic in every process
    if a.fault:
        kind, n = a.fault.split(":")
        hurt_at(kind, int(n))
    # K=3 with batches of 2: no step can pick every prompt equally, so the pick bias always moves.
    spt = SPTConfig(num_prompts=3, prompt_len=2, layout="shared", max_len=256, init="random")
    tc = TrainConfig(model=a.model, data=a.data, output_dir=a.out, max_steps=STEPS, batch_size=2, lr=1e-2,
                     save_every=1, eval_samples=2, resume=a.resume, progress=False)
    try:
        Trainer(spt, tc).fit()
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
