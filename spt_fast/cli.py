"""The `spt-fast` command: train, generate, eval, export, demo."""
import argparse
import json
import os
import sys
from pathlib import Path

from . import chat, serve_bench, study
from .errors import SPTError

FORMATS = ("convai2", "jsonl", "chitchat")


def _add_model(p):
    p.add_argument("--model", default="default",
                   help="base model: 'default' (embedded SmolLM2-135M-Instruct), a local Hugging Face folder, or a .gguf file")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="base model dtype (default fp32)")
    p.add_argument("--load-4bit", action="store_true", help="quantize the base model's linear layers to NF4 (bitsandbytes)")


def _add_data(p, required=False):
    p.add_argument("--data", default=None if required else "chitchat", required=required,
                   help="'chitchat' (the corpus of the chitchat-dataset package) or a ConvAI2 .txt / JSONL file")
    p.add_argument("--data-format", choices=FORMATS, default=None,
                   help="format of --data (default: from the file extension)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spt-fast", description="Selective Prompt Tuning (SPT), fast.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train K soft prompts and the retriever on a frozen LM",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model(t)
    _add_data(t)
    t.add_argument("--valid-data", default=None, help="validation file (default: hold out 5%% of --data by dialogue)")
    t.add_argument("--num-prompts", "-K", type=int, default=4, help="K, the number of soft prompts")
    t.add_argument("--prompt-len", "-L", type=int, default=8, help="L, virtual tokens per prompt")
    t.add_argument("--layout", choices=("auto", "prefix", "shared"), default="prefix",
                   help="prefix: [P][context][response] (the paper's); shared: [context][P][response], the "
                        "fast engine (Llama architectures); auto: shared where supported, else prefix")
    t.add_argument("--init", choices=("random", "vocab", "text"), default="vocab", help="soft prompt init")
    t.add_argument("--init-text", default=None, help="text for --init text")
    t.add_argument("--max-steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-4, help="learning rate of the soft prompts (paper: 1e-4)")
    t.add_argument("--retriever-lr", type=float, default=None, help="learning rate of the retriever (default: --lr)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-len", type=int, default=512, help="max tokens of prompt + context + response")
    t.add_argument("--lambda-sel", type=float, default=0.4)
    t.add_argument("--lambda-ctr", type=float, default=0.4)
    t.add_argument("--no-sel", action="store_true", help="drop the selection loss")
    t.add_argument("--no-fus", action="store_true", help="drop the prompt-fusion loss")
    t.add_argument("--no-ctr", action="store_true", help="drop the context-prompt contrastive loss")
    t.add_argument("--pt", action="store_true", help="plain prompt tuning baseline: K=1, LM loss only")
    t.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: at the end only)")
    t.add_argument("--eval-samples", type=int, default=64)
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    t.add_argument("--max-train-samples", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--output-dir", default="runs/spt")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="generate for held-out samples and print F1/BLEU/ROUGE/Distinct",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--checkpoint", required=True, help="a checkpoint folder or a training output folder")
    e.add_argument("--model", default=None, help="override the base model recorded in the checkpoint")
    _add_data(e)
    e.add_argument("--split", choices=("auto", "valid", "all"), default="auto",
                   help="auto: the held-out 5%% for chitchat, the whole file otherwise")
    e.add_argument("--max-samples", type=int, default=200)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--selection-noise", type=float, default=0.0, help="std of Gaussian noise on retriever scores")
    e.add_argument("--bertscore-model", default=None, help="local model folder for BERTScore (optional)")
    e.add_argument("--json", default=None, help="write the metrics here")
    e.add_argument("--predictions", default=None, help="write predictions (JSONL) here")
    e.add_argument("--plot", default=None, help="write the prompt-usage-per-turn PNG here")
    e.add_argument("--no-progress", action="store_true")

    g = sub.add_parser("generate", help="reply to one context (or each row of a JSONL file)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--model", default=None, help="override the base model recorded in the checkpoint")
    g.add_argument("--persona", action="append", default=[], help="a persona sentence (repeat for more)")
    g.add_argument("--history", action="append", default=[],
                   help="an utterance, oldest first; the last one is the partner's (repeat for more)")
    g.add_argument("--input", default=None, help="JSONL rows {persona, history}; prints one JSON reply per row")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--selection-noise", type=float, default=0.0)

    x = sub.add_parser("export", help="export one soft prompt as a PEFT prompt-tuning adapter",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--prompt-index", type=int, default=0, help="which of the K prompts")
    x.add_argument("--output", required=True, help="folder for adapter_config.json + adapter_model.safetensors")

    d = sub.add_parser("demo", help="the main job: SPT (K=4) vs PT (K=1) on the embedded default, then the table",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data(d)
    d.add_argument("--model", default="default")
    d.add_argument("--max-steps", type=int, default=60)
    d.add_argument("--batch-size", type=int, default=2)
    d.add_argument("--eval-samples", type=int, default=64)
    d.add_argument("--layout", choices=("auto", "prefix", "shared"), default="prefix")
    d.add_argument("--max-len", type=int, default=128)
    d.add_argument("--lr", type=float, default=3e-3, help="soft-prompt learning rate (a short run needs more than 1e-4)")
    d.add_argument("--retriever-lr", type=float, default=1e-4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("bench", help="benchmarks: train (step throughput/memory), generate (latency), kernels")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    from .bench_util import add_kernels_parser
    from .benchmark import add_train_parser

    add_train_parser(bsub)
    add_kernels_parser(bsub)
    serve_bench.add_parser(bsub)
    chat.add_parser(sub)
    study.add_parser(sub)
    return ap


def cmd_bench(a) -> None:
    if a.bench_cmd == "train":
        from .benchmark import run_train_cli

        run_train_cli(a)
    elif a.bench_cmd == "generate":
        serve_bench.run(a)
    elif a.bench_cmd == "kernels":
        from .bench_util import run_kernels_cli

        run_kernels_cli(a)


def cmd_train(a) -> None:
    from .spt import SPTConfig
    from .train import TrainConfig, Trainer

    if a.pt:
        spt = SPTConfig.prompt_tuning(prompt_len=a.prompt_len, layout=a.layout, max_len=a.max_len, seed=a.seed,
                                      init=a.init, init_text=a.init_text)
    else:
        spt = SPTConfig(num_prompts=a.num_prompts, prompt_len=a.prompt_len, layout=a.layout, init=a.init,
                        init_text=a.init_text, lambda_sel=a.lambda_sel, lambda_ctr=a.lambda_ctr,
                        use_sel=not a.no_sel, use_fus=not a.no_fus, use_ctr=not a.no_ctr, max_len=a.max_len,
                        seed=a.seed)
    spt.validate()
    tc = TrainConfig(model=a.model, data=a.data, data_format=a.data_format, valid_data=a.valid_data,
                     output_dir=a.output_dir, max_steps=a.max_steps, batch_size=a.batch_size,
                     grad_accum=a.grad_accum, lr=a.lr, retriever_lr=a.retriever_lr, weight_decay=a.weight_decay, dtype=a.dtype,
                     load_4bit=a.load_4bit, eval_every=a.eval_every, eval_samples=a.eval_samples,
                     save_every=a.save_every, seed=a.seed, resume=a.resume,
                     max_train_samples=a.max_train_samples, progress=not a.no_progress)
    summary = Trainer(spt, tc).fit()
    print(json.dumps({k: v for k, v in summary.items() if k != "usage"}, indent=2))


def _eval_samples(a):
    from .data import load_samples, split_by_dialog

    samples = load_samples(a.data, a.data_format)
    split = a.split
    if split == "auto":
        split = "valid" if a.data == "chitchat" or a.data_format == "chitchat" else "all"
    if split == "valid":
        samples = split_by_dialog(samples)[1]
    return samples


def cmd_eval(a) -> None:
    from .evaluate import evaluate, load_for_inference, write_predictions
    from .metrics import format_table
    from .plots import plot_prompt_usage

    samples = _eval_samples(a)
    spt, tok, config = load_for_inference(a.checkpoint, a.model)
    result = evaluate(spt, tok, samples, a.max_samples, a.batch_size, a.max_new_tokens, a.bertscore_model,
                      a.selection_noise, progress=not a.no_progress)
    K = spt.config.num_prompts
    print(format_table({f"{Path(a.checkpoint).name} (K={K})": result["metrics"]}))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({**result["metrics"], "checkpoint": a.checkpoint, "K": K,
                                            "usage": [result["picks"].count(k) for k in range(K)]}, indent=2))
    if a.predictions:
        write_predictions(a.predictions, result)
    if a.plot:
        plot_prompt_usage(result["turns"], result["picks"], K, a.plot)


def cmd_generate(a) -> None:
    from .data import Sample, load_contexts
    from .evaluate import load_for_inference
    from .generate import generate
    from .text import Encoder

    if a.input:
        samples = load_contexts(a.input)
    else:
        if not a.history:
            raise SPTError("generate: give at least one --history utterance (the partner's last message), or --input FILE")
        samples = [Sample(tuple(a.persona), tuple(a.history), "", "cli", len(a.history) // 2)]
    spt, tok, _ = load_for_inference(a.checkpoint, a.model)
    enc = Encoder(tok, spt.config.max_len, spt.config.prompt_len)
    encoded = []
    for s in samples:
        e = enc.encode(s, with_response=False)
        if e is None:
            raise SPTError(f"the persona alone is longer than max_len={spt.config.max_len} tokens")
        encoded.append(e)
    texts, picks = generate(spt, tok, encoded, a.batch_size, a.max_new_tokens, noise=a.selection_noise)
    for t, k in zip(texts, picks):
        if a.input:
            print(json.dumps({"reply": t, "prompt": k}))
        else:
            print(f"[prompt {k}] {t}")


def cmd_export(a) -> None:
    from .export import export_peft

    out = export_peft(a.checkpoint, a.prompt_index, a.output)
    print(f"wrote PEFT prompt-tuning adapter to {out}")


def cmd_demo(a) -> None:
    from .demo import run_demo

    run_demo(a.output_dir, a.model, a.data, a.data_format, a.max_steps, a.batch_size, a.eval_samples,
             layout=a.layout, max_len=a.max_len, lr=a.lr, retriever_lr=a.retriever_lr, seed=a.seed, progress=not a.no_progress)


COMMANDS = {"chat": lambda a: chat.run(a), "study": lambda a: study.run(a), "bench": cmd_bench, "train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "export": cmd_export, "demo": cmd_demo}


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.cmd](args)
    except SPTError as exc:
        print(f"spt-fast {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
