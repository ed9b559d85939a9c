"""`spt-fast bench train|generate|kernels`: the benchmarks of spt_fast.benchmarks, printed and
optionally written as JSON."""

import torch

from ..errors import SPTError
from ..model.cpu_projections import WEIGHTS
from ..utils import DTYPE_NAMES
from .common import HelpFormatter, add_compile_arg, write_json


def add_parser(sub) -> None:
    from ..benchmarks.generate import H100_SXM_BANDWIDTH
    from ..benchmarks.kernels import KERNEL_OPS
    from ..benchmarks.train import IMPLS

    b = sub.add_parser("bench", help="benchmarks: train (step throughput/memory), generate (latency), kernels")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    fmt = HelpFormatter

    p = bsub.add_parser("train", help="training-step throughput and memory: straightforward vs prefix vs shared",
                        formatter_class=fmt)
    p.add_argument("--model", default="default", help="'default', a local folder, or preset:NAME (random weights)")
    p.add_argument("--impl", action="append", choices=IMPLS, help="repeat to pick (default: all three)")
    p.add_argument("--num-prompts", "-K", type=int, default=4)
    p.add_argument("--prompt-len", "-L", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps (distinct batches) after one warm-up step")
    p.add_argument("--min-seconds", type=float, default=20.0,
                   help="repeat the timed steps (whole passes over the same batches) until this long has passed: "
                        "a few seconds of a fast impl are at the mercy of a shared machine's noise")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--world-size", type=int, action="append",
                   help="repeat: also run prefix and shared data-parallel in N processes under torchrun, the "
                        "same global batch split across them (default: 1, one process)")
    p.add_argument("--data", default="chitchat")
    p.add_argument("--context-len", type=int, default=None, help="synthetic data: context tokens per sample")
    p.add_argument("--response-len", type=int, default=None, help="synthetic data: response tokens per sample")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write the rows here")

    g = bsub.add_parser("generate", help="decode latency: transformers generate vs the spt_fast engine",
                        formatter_class=fmt)
    g.add_argument("--model", default="default",
                   help="'default', a local model folder, or preset:NAME (random weights, e.g. preset:llama-2-7b)")
    g.add_argument("--impls", default="hf,spt_fast",
                   help="comma-separated: hf, spt_fast, spt_fast-int8, spt_fast-int4 (CPU weight-only int8/int4), "
                        "spt_fast-w8a8 (CPU int8 weights and activations)")
    g.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    g.add_argument("--load-4bit", action="store_true")
    g.add_argument("--context-len", type=int, default=128)
    g.add_argument("--new-tokens", type=int, default=32)
    g.add_argument("--device", default=None)
    g.add_argument("--repeats", type=int, default=3)
    add_compile_arg(g)
    g.add_argument("--bandwidth", type=float, default=H100_SXM_BANDWIDTH,
                   help="GPU memory bandwidth (bytes/s) for the roofline (on CPU it is read beside each timing)")
    g.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="process: CPU time of the process (CPU runs with one thread on a shared machine)")
    g.add_argument("--json", default=None, help="write the rows here")

    v = bsub.add_parser("serve", help="the HTTP server under concurrent multi-turn clients (spawns it)",
                        formatter_class=fmt)
    v.add_argument("--checkpoint", default=None,
                   help="default: an untrained SPT checkpoint on the embedded model (K=4, L=8, shared, max_len 512)")
    v.add_argument("--levels", default="1,4,16,64", help="comma-separated numbers of concurrent clients")
    v.add_argument("--turns", type=int, default=4, help="turns per conversation")
    v.add_argument("--conversations", type=int, default=64,
                   help="conversations per level (at least one per client; clients take the next when done; "
                        "several per client keep the start and the last conversations' tail a small part of a level)")
    v.add_argument("--ramp", default="auto",
                   help="seconds over which a level's clients start (0: all at once); auto: the one-client "
                        "level's median request latency, so arrivals spread as under steady load")
    v.add_argument("--max-tokens", type=int, default=32)
    v.add_argument("--long-turns", type=int, default=8, help="turns of the context-cache measurement")
    v.add_argument("--device", default="cpu")
    v.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="the server's and the offline engine's dtype (default: serve's own default)")
    v.add_argument("--weights", choices=WEIGHTS, default=None,
                   help="the server's and the offline engine's CPU weights (as `serve --weights`)")
    v.add_argument("--json", default=None, help="write the results here")

    m = bsub.add_parser("memory", help="one SPT step on a 4-bit preset shape: peak memory split and estimated",
                        formatter_class=fmt)
    m.add_argument("--model", action="append", default=None,
                   help="preset:NAME (repeat; default preset:llama-2-7b)")
    m.add_argument("--layout", action="append", choices=("shared", "prefix"), default=None,
                   help="repeat (default: both)")
    m.add_argument("--num-prompts", "-K", type=int, action="append", default=None,
                   help="repeat to compare (default 4), e.g. -K 1 -K 4 -K 8")
    m.add_argument("--prompt-len", "-L", type=int, default=1, help="the paper's Llama-2 setting")
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--context-len", type=int, default=256)
    m.add_argument("--response-len", type=int, default=32)
    m.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16")
    m.add_argument("--activation-checkpointing", action="store_true",
                   help="shared layout: recompute the branch layers in the backward (train's flag of that name)")
    m.add_argument("--device", default=None)
    m.add_argument("--json", default=None, help="write the rows here")

    k = bsub.add_parser("kernels", help="Triton kernels vs their torch references (spt_fast.benchmarks.ops)",
                        formatter_class=fmt)
    k.add_argument("--op", action="append", choices=KERNEL_OPS, help="repeat to pick (default: all four)")
    k.add_argument("--device", default=None,
                   help="default: cuda if available, else cpu (on cpu only the references are timed)")
    k.add_argument("--json", default=None, help="write the rows here")


def run_train(a) -> list[dict]:
    from ..benchmarks.train import IMPLS, format_rows, run_train_bench

    rows = run_train_bench(a.model, tuple(a.impl or IMPLS), a.num_prompts, a.batch_size, a.steps, a.dtype,
                           a.load_4bit, a.max_len, a.data, a.context_len, a.response_len, a.prompt_len, a.device,
                           worlds=tuple(dict.fromkeys(a.world_size or [1])), min_seconds=a.min_seconds)
    print(format_rows(rows))
    return rows


def run_generate(a) -> list[dict]:
    from ..benchmarks.generate import format_rows, run_generate_bench

    try:
        batch_sizes = tuple(int(x) for x in a.batch_sizes.split(",") if x.strip())
    except ValueError:
        raise SPTError(f"--batch-sizes must be comma-separated integers, got {a.batch_sizes!r}") from None
    if not batch_sizes or min(batch_sizes) < 1:
        raise SPTError("--batch-sizes needs positive integers")
    impls = tuple(x.strip() for x in a.impls.split(",") if x.strip())
    rows = run_generate_bench(a.model, impls, batch_sizes, a.dtype, a.load_4bit, a.context_len, a.new_tokens,
                              a.device, repeats=a.repeats, compile=a.compile, bandwidth=a.bandwidth, clock=a.clock)
    print(format_rows(rows))
    return rows


def run_kernels(a) -> list[dict]:
    from ..benchmarks.kernels import KERNEL_OPS, check_device, format_kernel_rows, run_kernel_benchmarks
    from ..benchmarks.timing import default_device

    device = a.device or default_device()
    gpu = check_device(device)
    if gpu:
        print(f"kernel benchmarks on {device} ({torch.cuda.get_device_name(torch.device(device))}): "
              f"Triton vs torch reference; speed-up = ref ms / triton ms")
    else:
        print(f"kernel benchmarks on {device}: only the torch references are timed (the Triton kernels would "
              f"run in the interpreter, which measures nothing); fewer repetitions, and for the slow ops fewer "
              f"shapes, than on GPU")
    rows = run_kernel_benchmarks(list(dict.fromkeys(a.op or KERNEL_OPS)), device)
    print(format_kernel_rows(rows, gpu))
    return rows


def run_serve(a) -> dict:
    from ..benchmarks.serve import run_serve_bench, summary_lines

    try:
        levels = tuple(int(x) for x in a.levels.split(",") if x.strip())
    except ValueError:
        raise SPTError(f"--levels must be comma-separated integers, got {a.levels!r}") from None
    if not levels or min(levels) < 1:
        raise SPTError(f"--levels must be positive integers, got {a.levels!r}")
    ramp = a.ramp
    if ramp != "auto":
        try:
            ramp = float(ramp)
        except ValueError:
            raise SPTError(f"--ramp must be seconds or auto, got {a.ramp!r}") from None
        if ramp < 0:
            raise SPTError(f"--ramp must be seconds >= 0 or auto, got {a.ramp!r}")
    if a.conversations < 1:
        raise SPTError(f"--conversations must be at least 1, got {a.conversations}")
    result = run_serve_bench(a.checkpoint, levels, a.turns, a.max_tokens, a.long_turns, a.device, a.dtype,
                             a.conversations, ramp, a.weights)
    for line in summary_lines(result):
        print(line)
    return result


def run_memory(a) -> list[dict]:
    from ..benchmarks.memory import run_memory_bench
    from ..model.loading import PRESET_PREFIX

    models = a.model or ["preset:llama-2-7b"]
    bad = [m for m in models if not m.startswith(PRESET_PREFIX)]
    if bad:
        raise SPTError(f"--model must be preset:NAME (random weights built in NF4), got {bad[0]!r}")
    return run_memory_bench(tuple(m[len(PRESET_PREFIX):] for m in models), tuple(a.layout or ("shared", "prefix")),
                            tuple(a.num_prompts or (4,)), a.batch_size, a.context_len, a.response_len, a.prompt_len, a.dtype,
                            a.device, checkpointing=a.activation_checkpointing)


def run(a) -> list[dict]:
    rows = {"train": run_train, "generate": run_generate, "kernels": run_kernels, "serve": run_serve,
            "memory": run_memory}[a.bench_cmd](a)
    if a.json:
        write_json(a.json, rows)
        print(f"wrote {a.json}")
    return rows
