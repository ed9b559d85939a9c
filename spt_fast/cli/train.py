"""`spt-fast train`: K soft prompts and the retriever on a frozen LM.

With --resume, every setting not given on the command line is the one the run was started with
(read from its newest intact checkpoint); a setting given that differs is refused unless it is
safe to change and --allow-changes is given (spt_fast.training.resume)."""
import json
from dataclasses import fields

from ..model.layouts import layout_choices
from ..model.prompts import RETRIEVERS
from ..model.spt import INITS, SPTConfig
from ..training import checkpoint
from ..training.presets import PRESETS, describe, preset
from ..training.trainer import TrainConfig, Trainer
from .common import HelpFormatter, add_data_args, add_model_args, explicit_flags

# Flags that set other config fields than their own name (the rest set the field of their name).
_SETS = {"no_sel": ["use_sel"], "no_fus": ["use_fus"], "no_ctr": ["use_ctr"], "strict": ["strict_data"],
         "pt": ["num_prompts", "use_sel", "use_fus", "use_ctr"], "no_progress": ["progress"]}


def add_arguments(p) -> None:
    s, t = SPTConfig(), TrainConfig()
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="the paper's run configuration by name (flags given explicitly override it): " + describe())
    add_model_args(p)
    add_data_args(p, t.data)
    p.add_argument("--valid-data", default=t.valid_data,
                   help="validation file (default: hold out 5%% of --data by dialogue)")
    p.add_argument("--strict", action="store_true",
                   help="samples with an empty response are errors (default: skipped, with one summary line)")
    p.add_argument("--num-prompts", "-K", type=int, default=s.num_prompts, help="K, the number of soft prompts")
    p.add_argument("--prompt-len", "-L", type=int, default=s.prompt_len, help="L, virtual tokens per prompt")
    p.add_argument("--layout", choices=layout_choices(), default=s.layout,
                   help="prefix: [P][context][response] (the paper's); shared: [context][P][ R:][response], the "
                        "fast engine (Llama architectures); auto: shared where supported, else prefix")
    p.add_argument("--init", choices=INITS, default=s.init, help="soft prompt init")
    p.add_argument("--init-text", default=s.init_text, help="text for --init text")
    p.add_argument("--max-steps", type=int, default=t.max_steps)
    p.add_argument("--epochs", type=float, default=t.epochs,
                   help="train this many passes over the training samples (sets --max-steps)")
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--grad-accum", type=int, default=t.grad_accum)
    p.add_argument("--lr", type=float, default=t.lr, help="learning rate of the soft prompts (paper: 1e-4)")
    p.add_argument("--retriever-lr", type=float, default=t.retriever_lr,
                   help="learning rate of the retriever (the paper: the same as --lr)")
    p.add_argument("--weight-decay", type=float, default=t.weight_decay)
    p.add_argument("--activation-checkpointing", action="store_true", default=t.activation_checkpointing,
                   help="shared layout: recompute the frozen layers of the prompt+response branches in the "
                        "backward instead of keeping their activations (a 7B step fits in far less memory, "
                        "~1/3 more compute)")
    p.add_argument("--max-len", type=int, default=s.max_len, help="max tokens of prompt + context + response")
    p.add_argument("--lambda-sel", type=float, default=s.lambda_sel,
                   help="weight of the selection loss (the paper: 0.4 for OPT, 1.0 for Llama-2-7b)")
    p.add_argument("--lambda-ctr", type=float, default=s.lambda_ctr,
                   help="weight of the contrastive loss (the paper: 0.4 for OPT, 1.0 for Llama-2-7b; README)")
    p.add_argument("--retriever", choices=RETRIEVERS, default=s.retriever,
                   help="centered: context features standardised with corpus statistics before W; "
                        "paper: the paper's retriever exactly (raw pooled features)")
    p.add_argument("--tau-gold", type=float, default=s.tau_gold,
                   help="temperature of the selection target softmax(-CE / tau) (the paper: 1; the default is sharper, README)")
    p.add_argument("--target-noise", type=float, default=s.target_noise,
                   help="std of Gaussian noise added to the selection target (the authors' Llama-2 run: 0.1)")
    p.add_argument("--route", type=float, default=s.route,
                   help="share of each sample's LM loss on the prompt the retriever picks (0: the paper's plain "
                        "mean over the K prompts; README, 'Quality study')")
    p.add_argument("--key-grad", action="store_true",
                   help="let the retriever's losses train the prompts through their keys, as the paper does "
                        "(default: they train the retriever's W only; README, 'Quality study')")
    p.add_argument("--balance-rate", type=float, default=s.balance_rate,
                   help="step of the retriever's pick bias against each prompt's share of the training picks "
                        "(0: the scores alone pick, as in the paper; README, 'Quality study')")
    p.add_argument("--no-sel", action="store_true", help="drop the selection loss")
    p.add_argument("--no-fus", action="store_true", help="drop the prompt-fusion loss")
    p.add_argument("--no-ctr", action="store_true", help="drop the context-prompt contrastive loss")
    p.add_argument("--pt", action="store_true", help="plain prompt tuning baseline: K=1, LM loss only")
    p.add_argument("--eval-every", type=int, default=t.eval_every, help="validate every N steps (0: at the end only)")
    p.add_argument("--eval-samples", type=int, default=t.eval_samples)
    p.add_argument("--save-every", type=int, default=t.save_every, help="checkpoint every N steps (0: off)")
    p.add_argument("--save-minutes", type=float, default=t.save_minutes,
                   help="checkpoint at least every N minutes (0: off); always at the end and on Ctrl-C/SIGTERM")
    p.add_argument("--max-train-samples", type=int, default=t.max_train_samples)
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--output-dir", default=t.output_dir)
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its newest checkpoint")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: apply a changed --max-steps, --lr, --retriever-lr, --weight-decay or --model")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir (removes it)")
    p.add_argument("--dist-timeout", type=float, default=t.dist_timeout,
                   help="under torchrun: seconds a process waits for the others before giving up")
    p.add_argument("--no-progress", action="store_true")


def add_parser(sub) -> None:
    add_arguments(sub.add_parser("train", help="train K soft prompts and the retriever on a frozen LM",
                                 formatter_class=HelpFormatter))


def spt_config(a) -> SPTConfig:
    common = dict(prompt_len=a.prompt_len, layout=a.layout, max_len=a.max_len, seed=a.seed, init=a.init,
                  init_text=a.init_text)
    if a.pt:
        return SPTConfig.prompt_tuning(**common)
    return SPTConfig(num_prompts=a.num_prompts, lambda_sel=a.lambda_sel, lambda_ctr=a.lambda_ctr,
                     use_sel=not a.no_sel, use_fus=not a.no_fus, use_ctr=not a.no_ctr, retriever=a.retriever,
                     tau_gold=a.tau_gold, target_noise=a.target_noise, route=a.route, key_grad=a.key_grad,
                     balance_rate=a.balance_rate, **common)


def train_config(a) -> TrainConfig:
    return TrainConfig(model=a.model, data=a.data, data_format=a.data_format, valid_data=a.valid_data,
                       output_dir=a.output_dir, max_steps=a.max_steps, epochs=a.epochs, batch_size=a.batch_size,
                       grad_accum=a.grad_accum, lr=a.lr, retriever_lr=a.retriever_lr, weight_decay=a.weight_decay,
                       dtype=a.dtype, load_4bit=a.load_4bit,
                       activation_checkpointing=a.activation_checkpointing, eval_every=a.eval_every, eval_samples=a.eval_samples,
                       save_every=a.save_every, save_minutes=a.save_minutes, seed=a.seed, resume=a.resume,
                       overwrite=a.overwrite, allow_changes=a.allow_changes, strict_data=a.strict,
                       max_train_samples=a.max_train_samples, dist_timeout=a.dist_timeout,
                       progress=not a.no_progress)


def given_fields(a) -> set[str]:
    """The config fields this command line set explicitly."""
    given = set()
    for dest in explicit_flags(add_arguments, getattr(a, "argv", [])[1:]):
        given.update(_SETS.get(dest, [dest]))
    return given


def with_preset(name: str, given: set[str], spt: SPTConfig, tc: TrainConfig) -> tuple[SPTConfig, TrainConfig]:
    """The preset's settings, except where a flag was given explicitly."""
    values = {k: v for k, v in preset(name).items() if k not in given}
    spt_names, tc_names = {f.name for f in fields(SPTConfig)}, {f.name for f in fields(TrainConfig)}
    spt = spt.replace(**{k: v for k, v in values.items() if k in spt_names})
    return spt, TrainConfig(**{**vars(tc), **{k: v for k, v in values.items() if k in tc_names}})


def resumed_configs(a, spt: SPTConfig, tc: TrainConfig) -> tuple[SPTConfig, TrainConfig]:
    """The run's recorded settings, with the ones given on this command line on top."""
    _, config, _ = checkpoint.load(a.output_dir, need_state=True)  # the one Trainer resumes from
    given = given_fields(a)
    rec_spt = SPTConfig.from_dict(config.get("spt", {}))
    rec_tc = TrainConfig.from_dict(config.get("train", {}))
    spt = spt.replace(**{f.name: getattr(rec_spt, f.name) for f in fields(SPTConfig) if f.name not in given})
    keep = {f.name: getattr(rec_tc, f.name) for f in fields(TrainConfig)
            if f.name not in given and f.name not in ("output_dir", "resume", "overwrite", "allow_changes", "progress")}
    return spt, TrainConfig(**{**vars(tc), **keep})


def run(a) -> None:
    spt, tc = spt_config(a), train_config(a)
    given = given_fields(a)
    if a.preset:
        spt, tc = with_preset(a.preset, given, spt, tc)
    if a.resume and checkpoint.holds_checkpoint(a.output_dir):
        spt, tc = resumed_configs(a, spt, tc)
    if "max_steps" in given and "epochs" not in given:  # an explicit step count wins over epochs
        tc = TrainConfig(**{**vars(tc), "epochs": None})
    trainer = Trainer(spt.validate(), tc)
    summary = trainer.fit()
    trainer.forward = trainer.model  # release the DDP wrapper before its process group
    trainer.dist.close()  # (not after a failure: a dead peer could make it wait)
    if trainer.dist.main:
        print(json.dumps({k: v for k, v in summary.items() if k != "usage"}, indent=2))
