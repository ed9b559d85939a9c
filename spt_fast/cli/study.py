"""`spt-fast study`: the quality study (evaluation.study), resumable."""
from ..data.corpora import FORMATS
from ..evaluation import study
from ..evaluation.study import StudyConfig, run_specs, run_study
from ..model.prompts import RETRIEVERS
from .common import HelpFormatter


def add_parser(sub) -> None:
    d = StudyConfig()
    p = sub.add_parser("study", help="quality study: PT vs SPT, prefix vs shared, loss ablations (resumable)",
                       description=study.__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--model", default=d.model, help="'default' (embedded SmolLM2-135M-Instruct) or a local HF folder")
    p.add_argument("--data", default=d.data, help="'chitchat' or a ConvAI2/JSONL file")
    p.add_argument("--data-format", choices=FORMATS, default=d.data_format)
    p.add_argument("--steps", type=int, default=d.steps, help="training steps of every run")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds)
    p.add_argument("--num-prompts", "-K", type=int, default=d.num_prompts)
    p.add_argument("--prompt-len", "-L", type=int, default=d.prompt_len)
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--retriever-lr", type=float, default=d.retriever_lr)
    p.add_argument("--retriever", choices=RETRIEVERS, default=d.retriever)
    p.add_argument("--tau-gold", type=float, default=d.tau_gold, help="temperature of the selection target")
    p.add_argument("--route", type=float, default=d.route,
                   help="share of each sample's LM loss on the retriever's pick (SPT runs)")
    p.add_argument("--key-grad", action="store_true",
                   help="the retriever's losses also train the prompts through their keys (the paper)")
    p.add_argument("--balance-rate", type=float, default=d.balance_rate,
                   help="step of the retriever's pick bias against each prompt's share of the picks (0: off)")
    p.add_argument("--lambda-sel", type=float, default=d.lambda_sel, help="weight of the selection loss")
    p.add_argument("--lambda-ctr", type=float, default=d.lambda_ctr, help="weight of the contrastive loss")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="held-out samples for generation metrics")
    p.add_argument("--val-samples", type=int, default=d.val_samples, help="held-out samples for validation loss")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--runs", nargs="+", default=d.runs, help=f"subset of {list(run_specs(4))}")
    p.add_argument("--jobs", type=int, default=d.jobs,
                   help="runs trained at once, in that many processes sharing the threads (2 on a 2-core CPU: "
                        "~1.3x the runs per hour of one process; README, Quality study)")
    p.add_argument("--no-progress", action="store_true")


def run(a) -> dict:
    sc = StudyConfig(output_dir=a.output_dir, model=a.model, data=a.data, data_format=a.data_format, steps=a.steps,
                     batch_size=a.batch_size, seeds=list(a.seeds), num_prompts=a.num_prompts,
                     prompt_len=a.prompt_len, max_len=a.max_len, lr=a.lr, retriever_lr=a.retriever_lr,
                     retriever=a.retriever, tau_gold=a.tau_gold, route=a.route, key_grad=a.key_grad,
                     balance_rate=a.balance_rate, lambda_sel=a.lambda_sel, lambda_ctr=a.lambda_ctr,
                     eval_samples=a.eval_samples, val_samples=a.val_samples, max_new_tokens=a.max_new_tokens,
                     runs=a.runs, progress=not a.no_progress, jobs=a.jobs)
    return run_study(sc)
