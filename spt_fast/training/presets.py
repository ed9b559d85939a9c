"""The paper's run configurations by name (the authors' published configs and training command).

From their repository (config/convai2/*.yml and the README's command): K = 4 soft prompts;
L = 8 virtual tokens and lambda_sel = lambda_ctr = 0.4 for OPT-125m/1.3b/2.7b; L = 1 and 1.0 for
Llama-2-7b (one of its two configs adds N(0, 0.1²) noise to the selection target); learning rate
1e-4 and a batch of 2 per GPU for one epoch; sequences of at most 512 tokens; prompts initialised
N(0, 1) (PEFT's random init); the paper's retriever on the raw pooled features, trained at the
prompts' rate, with the selection target at temperature 1, and the LM loss the plain mean over the
K prompts (route 0), the retriever's losses reaching the prompts through their keys (key_grad), and the
scores alone picking (balance_rate 0). The authors publish no prompt-tuning (PT) baseline config: the `-pt` presets are
the same settings with one prompt and the LM loss only.
"""
from ..errors import SPTError

_COMMON = {"num_prompts": 4, "lr": 1e-4, "retriever_lr": None, "batch_size": 2, "epochs": 1.0, "max_len": 512,
           "init": "normal", "retriever": "paper", "target_noise": 0.0, "tau_gold": 1.0, "route": 0.0,
           "key_grad": True, "balance_rate": 0.0}
_OPT = {**_COMMON, "prompt_len": 8, "lambda_sel": 0.4, "lambda_ctr": 0.4}
_LLAMA = {**_COMMON, "prompt_len": 1, "lambda_sel": 1.0, "lambda_ctr": 1.0}
_PT = {"num_prompts": 1, "use_sel": False, "use_fus": False, "use_ctr": False}

PRESETS: dict[str, dict] = {
    "opt-125m": _OPT, "opt-1.3b": _OPT, "opt-2.7b": _OPT,
    "llama2-7b": _LLAMA, "llama2-7b-noise": {**_LLAMA, "target_noise": 0.1},
}
PRESETS.update({f"{name}-pt": {**values, **_PT} for name, values in list(PRESETS.items())
                if not name.endswith("-noise")})
# The base model each preset was run with (give its local folder as --model).
MODELS = {"opt-125m": "facebook/opt-125m", "opt-1.3b": "facebook/opt-1.3b", "opt-2.7b": "facebook/opt-2.7b",
          "llama2-7b": "meta-llama/Llama-2-7b-chat-hf", "llama2-7b-noise": "meta-llama/Llama-2-7b-chat-hf"}


def preset(name: str) -> dict:
    """The settings of a named preset (SPTConfig and TrainConfig field names)."""
    if name not in PRESETS:
        raise SPTError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return dict(PRESETS[name])


def describe() -> str:
    """One line per preset for --help and README."""
    lines = []
    for name, v in PRESETS.items():
        what = "PT: K=1, LM loss only" if name.endswith("-pt") else \
            f"K={v['num_prompts']}, L={v['prompt_len']}, lambda={v['lambda_sel']}"
        noise = f", target noise {v['target_noise']}" if v["target_noise"] else ""
        lines.append(f"{name} ({MODELS[name.removesuffix('-pt')]}): {what}{noise}")
    return "; ".join(lines)
