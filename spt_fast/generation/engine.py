"""Low-latency SPT generation: `Engine` (Python API) over the compact Llama with a static KV cache.

One generation call, for a batch where every row has its own persona, history and prompt:
1. tokenise each (persona, history) into the paper's context (oldest turns dropped to fit);
2. embed the right-padded contexts once; the retriever scores them from those embeddings
   (pool_context + retrieval: Triton on CUDA) and picks one soft prompt per row;
3. inject each row's prompt into the same embedding buffer where the layout's rule puts it
   (model.layouts: ragged per-row positions);
4. prefill the rows once into a static per-layer `KVCache` (the prompt is known before the
   prefill, so one pass covers context and prompt); slot j of a row is its position j, so ragged
   rows need no left padding and each decodes at its own position;
5. decode one token per step for the whole batch. Token choice (greedy / temperature + top-p),
   eos and stop-string detection (a token-level automaton, `stops.StopTable`) all run on the
   device; the host looks only every `check_every` steps (1 on CPU, 8 on GPU, 1 when streaming),
   and stops early once every row is finished. With `compile=True` the decode step (model +
   sampling + stop check) is one torch.compile'd function, CUDA-graphed on GPU; "background"
   (what `from_checkpoint` picks on CPU) runs a kind of step eagerly once and compiled after.

Non-Llama models fall back to the Hugging Face forward with its own cache (backends.HFBackend),
with one warning; everything else (retrieval, sampling, stops, streaming) is shared. Everything
that reports a metric or serves a reply goes through this engine.

Input rules: an empty history is allowed (the reply opens the conversation from the persona
alone); a persona that leaves no room in the context budget is an SPTError naming the row; a
context that would run past the model's positions with max_new_tokens is an SPTError too.
"""
from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..data.corpora import Sample, clean
from ..data.text import REPLY_TAG, Encoder
from ..errors import SPTError
from ..kernels.inject import inject_prompts
from ..utils import cpu_has_native_bf16, dtype_name
from .backends import FastBackend, HFBackend
from .decoding import GenConfig, advance, row_tokens
from .stops import StopTable, TextDelta, cut_reply, token_pieces


@dataclass
class Reply:
    text: str  # the reply, cut at the first stop string and stripped
    prompt: int  # the soft prompt used (retrieved or forced)
    tokens: list[int]  # generated ids up to the finish (eos excluded)
    finish: str  # "stop" (a stop string), "eos", or "length" (max_new_tokens reached)
    truncated: bool = False  # the conversation did not fit max_len: old turns dropped or the newest cut


def decode_loop(backend, rows, lengths, gen: GenConfig, eos_id: int, stop_table, generator, live: int,
                sync_every: int) -> Iterator[torch.Tensor]:
    """Prefill, then decode; yields host chunks [B, n] of emitted ids (-1 once a row finished).

    Rows at index >= live are padding (finished from the start). The host syncs once per chunk.
    """
    B, device = rows.shape[0], rows.device
    n = gen.max_new_tokens
    logits = backend.prefill(rows, lengths, n)
    V = logits.shape[-1]
    done = torch.arange(B, device=device) >= live
    state = torch.zeros(B, dtype=torch.long, device=device)
    out = torch.full((B, n), -1, dtype=torch.long, device=device)
    table = None if stop_table is None else stop_table.table

    def noise():
        return None if gen.greedy else torch.empty(B, V, device=device).exponential_(generator=generator)

    args = (gen.temperature, gen.top_p, table, eos_id, gen.ignore_eos)
    token, emitted, done, state = advance(logits, done, state, eos_id, gen.temperature, gen.top_p, noise(), table,
                                          gen.ignore_eos)
    out[:, 0] = emitted
    pos = lengths.clone()  # the first generated token sits right after each row's prompt + context
    top = rows.shape[1]  # host-side bound: every row's pos < rows.shape[1] + t at step t
    shown = 0
    for t in range(1, n + 1):
        if t == n or t % sync_every == 0:
            # One transfer carries the new ids and the finished flags.
            host = torch.cat([out[:, shown:t], done[:, None].long()], dim=1).cpu()
            yield host[:, :-1]
            shown = t
            if t == n or bool(host[:, -1].all()):
                return
        token, emitted, done, state = backend.step(token, pos, done, state, noise(), *args, max_pos=top + t - 1)
        pos = pos + 1
        out[:, t] = emitted


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
def _as_conversation(i, conv):
    if isinstance(conv, dict):
        persona, history = conv.get("persona", ()), conv.get("history")
    elif isinstance(conv, (tuple, list)) and len(conv) == 2:
        persona, history = conv
    else:
        raise SPTError(f"conversation {i}: expected (persona, history) or a dict with 'persona' and 'history'")
    if isinstance(persona, str):
        persona = [persona] if persona.strip() else []
    if persona is None:
        persona = []
    if not isinstance(persona, (list, tuple)) or not all(isinstance(p, str) for p in persona):
        raise SPTError(f"conversation {i}: persona must be a string or a list of strings")
    if history is None:
        history = []
    if isinstance(history, str) or not isinstance(history, (list, tuple)) \
            or not all(isinstance(h, str) for h in history):
        raise SPTError(f"conversation {i}: history must be a list of utterances (strings), oldest first")
    return tuple(clean(p) for p in persona if p.strip()), tuple(clean(h) for h in history)



def generation_dtype(device) -> str | None:
    """The dtype generation uses unless told: "bf16" on a CPU that multiplies bf16 in hardware
    (AVX-512 BF16 or AMX), where a decode step reads half the bytes of fp32 at the same math speed;
    None (the checkpoint's training dtype) elsewhere. Training keeps its own --dtype."""
    return "bf16" if torch.device(device).type == "cpu" and cpu_has_native_bf16() else None

COMPILE_CHOICES = ("auto", "on", "off")


def compile_mode(compile, device, cpu_projections: bool):
    """The decode-step mode for an engine: False (eager), True (compiled before the first step) or
    "background" (CPU: the first call of each kind of step eager, the kind compiled before the
    second, or between calls by compile_pending; the compiled code persists on disk, so a later
    run recompiles in seconds, not a minute or two; see FastBackend).

    "auto" means background on a CPU whose dense layers run on the engine's CPU projections (dense
    or int8/int4 weights), eager elsewhere (GPU: the compiled CUDA-graph step is --compile on). The
    environment variable SPT_FAST_COMPILE=auto|on|off sets what "auto" means (the tests use off).
    """
    if compile in ("auto", None):
        compile = os.environ.get("SPT_FAST_COMPILE", "auto").strip().lower()
        if compile not in COMPILE_CHOICES:
            raise SPTError(f"SPT_FAST_COMPILE={compile!r}: expected one of {', '.join(COMPILE_CHOICES)}")
        if compile == "auto":
            return "background" if torch.device(device).type == "cpu" and cpu_projections else False
    if compile in ("on", True):
        return True
    if compile in ("off", False):
        return False
    if compile == "background":
        return compile
    raise SPTError(f"compile={compile!r}: expected one of {', '.join(COMPILE_CHOICES)} (or True/False)")


def use_persistent_compile_cache() -> None:
    """Keep inductor's compiled code under our cache folder (~/.cache/spt_fast/inductor), unless the
    user chose a folder: its default is under /tmp, which a reboot empties. Inductor writes its
    default into the environment at its first use, hence the comparison rather than setdefault."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from ..model.loading import cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


class Engine:
    """Replies from a trained SPT checkpoint, one or many conversations at a time.

    `last_prompts` (and `last_replies`) hold the soft prompt chosen for each row of the latest
    call; for a stream they are set before the first piece of text is yielded.

    On CPU, `cpu_weight_layout=True` (the default) runs the dense layers on oneDNN-packed copies of
    their weights (one more copy of the dense weights in memory; see spt_fast.model.cpu_projections), and
    column-major weights where those do not apply; False runs the model's own layers as they are.
    `compile=True` on CPU always uses the packed copies. `weights="int8"` / `"int4"` (CPU) decode with
    weight-only quantized copies of the dense layers instead (a quarter / an eighth of the fp32
    bytes to read per step; the replies may differ slightly from full precision); `"w8a8"` with
    int8 weights and per-row int8 activations (exact integer products; the fastest on a CPU
    without native bf16, and the furthest from fp32).
    """

    def __init__(self, spt, tokenizer=None, device=None, compile: bool = False, cpu_weight_layout: bool = True,
                 weights: str | None = None):
        from ..model.build import fast_path_problem
        from ..model.cpu_projections import attach_cpu_projections
        from ..model.llama import Llama, column_major_linears
        from ..model.quant import attach_nf4_kernels, guard_4bit, is_quantized

        if device is not None:
            spt.to(device)
        spt.eval()
        if is_quantized(spt.base):
            # Inference must not repack NF4 weights for the CPU kernel: the same model may train later.
            guard_4bit(spt.base)
        self.spt = spt
        self.tokenizer = tokenizer
        self.config = spt.config
        self.nf4_kernels = False
        self.cpu_projections = False
        problem = fast_path_problem(spt.base)
        if problem is None:
            llama = getattr(spt, "fast", None)
            nf4 = spt.device.type == "cuda" and is_quantized(spt.base)
            cpu_dense = spt.device.type == "cpu" and not is_quantized(spt.base) and (compile not in (False, "off") or cpu_weight_layout)
            if not isinstance(llama, Llama) or nf4 or cpu_dense or weights:
                # A private view where layers get swapped below: the model's own layers (training,
                # the HF path) stay untouched.
                llama = Llama.from_hf_modules(spt.base)
            if nf4:
                # NF4 on GPU: the view computes q/k/v, o, gate/up and down with the project's NF4
                # kernels (one launch per group, bitsandbytes' tensors read in place).
                self.nf4_kernels = attach_nf4_kernels(llama)
            elif cpu_dense or weights:
                # CPU: projections on oneDNN-packed copies of the weights (the prefill, batched and
                # eager decode: 1.2-2x faster than the BLAS here) and, in a compiled step, one row as
                # a streamed product-sum; or weight-only int8/int4 copies (spt_fast.model.cpu_projections).
                from ..model.loading import cache_dir

                self.cpu_projections = attach_cpu_projections(llama, weights, cache_dir() / "cpu_kernels.json")
            if cpu_weight_layout and spt.device.type == "cpu" and not self.cpu_projections:
                # Eager decode multiplies a few rows by every weight; column-major weights take the
                # BLAS's fast path for that on some CPUs (values unchanged; shared with spt.base).
                column_major_linears(llama)
            if weights and not self.cpu_projections:
                raise SPTError(f"weights={weights!r} is a CPU option for a full-precision (fp32/bf16) base")
            mode = compile_mode(compile, spt.device, self.cpu_projections)
            if mode and spt.device.type == "cpu":
                use_persistent_compile_cache()
            # With the CPU projections attached the step reads weights as inputs: cacheable.
            self.backend = FastBackend(llama, compile=mode, nf4=self.nf4_kernels, freeze=not self.cpu_projections)
            self.max_positions = llama.config.max_seq_len
        else:
            if weights:
                raise SPTError(f"weights={weights!r} needs the compact Llama engine ({problem})")
            warnings.warn(f"the fast generation engine does not support this model ({problem}); falling back "
                          "to the Hugging Face generation path (slower)", stacklevel=2)
            self.backend = HFBackend(spt.base)
            self.max_positions = getattr(spt.base.config, "max_position_embeddings", None) or 1 << 30
        cfg = spt.base.config
        self.eos_id = tokenizer.eos_token_id if tokenizer is not None else cfg.eos_token_id
        if isinstance(self.eos_id, (list, tuple)):
            self.eos_id = self.eos_id[0]
        if self.eos_id is None:
            self.eos_id = -2  # no eos: never matches a token id
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        self.pad_id = pad if pad is not None else 0
        self.bos_id = tokenizer.bos_token_id if tokenizer is not None else getattr(cfg, "bos_token_id", None)
        self._encoder = None
        self._tag_ids = None
        self._stop_tables: dict = {}
        self._pieces: list[str] | None = None
        self.last_prompts: list[int] = []
        self.last_replies: list[Reply] = []

    @property
    def compile(self):
        """How decode steps run: False (eager), True (compiled), "background" (see compile_mode)."""
        return getattr(self.backend, "compile", False)

    def compile_pending(self) -> None:
        """Background compile mode: compile the kinds of step that ran eagerly so far, in a second
        thread, now (for a caller about to be idle, e.g. waiting for its user); else nothing."""
        if getattr(self.backend, "background", False):
            self.backend.compile_pending()

    @property
    def fast(self) -> bool:
        return isinstance(self.backend, FastBackend)

    @property
    def device(self) -> torch.device:
        return self.spt.device

    @classmethod
    def from_checkpoint(cls, path, device=None, dtype=None, compile: bool | str = "auto", model: str | None = None,
                        load_4bit: bool | None = None, layout: str | None = None,
                        weights: str | None = None) -> "Engine":
        """An engine for a checkpoint (or training output) folder; the base model is the one recorded
        there unless `model` overrides it. dtype: "fp32"/"bf16" or a torch dtype; None means
        generation_dtype(device): bf16 on a CPU with native bf16 math, else as trained; "recorded"
        the training dtype. compile: "auto" (the default here; see compile_mode), "on"/True, "off"/False."""
        from ..training.checkpoint import load_for_inference

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "recorded":  # the checkpoint's training dtype (the server's default)
            dtype = None
        else:
            dtype = generation_dtype(device) if dtype is None else dtype_name(dtype)
        spt, tok, _ = load_for_inference(str(path), model, dtype, load_4bit, layout)
        return cls(spt, tok, device=device, compile=compile, weights=weights)

    @classmethod
    def for_serving(cls, path, device=None, dtype=None, model: str | None = None, load_4bit: bool | None = None,
                    weights: str | None = None) -> "Engine":
        """The engine `serve` runs (eager). dtype None: generation_dtype(device) (bf16 on a CPU with
        native bf16 math) where the engine is batch_invariant in it, else the training dtype: a
        greedy reply must never depend on the requests that share its batch."""
        kw = dict(device=device, model=model, load_4bit=load_4bit, weights=weights, compile=False)
        if dtype is not None:
            return cls.from_checkpoint(path, dtype=dtype, **kw)
        engine = cls.from_checkpoint(path, dtype=None, **kw)
        if generation_dtype(engine.device) is None or engine.batch_invariant():
            return engine
        del engine  # (freed before the other dtype loads: never two copies of the model at once)
        gc.collect()
        return cls.from_checkpoint(path, dtype="recorded", **kw)

    def batch_invariant(self) -> bool:
        """Whether a token's numbers never depend on the other tokens of its pass: every one-token
        step, prefill and joint pass (any number of rows) runs the whole-step C call, whose
        products sum each row alone in one order and whose norms and attention are per token, and
        the logits come from the same C product. Dense weights only: int weights run few rows on
        their own kernels and many as dequantized tiles, which round differently."""
        from ..model.cpu_projections import CPUProjection, QuantProjection, W8A8Projection

        llama = getattr(self.backend, "llama", None)
        fused = getattr(llama, "fused_decode", None)
        if fused is None or any(isinstance(m, (QuantProjection, W8A8Projection)) for m in llama.modules()):
            return False
        rows = (1, 2, QuantProjection.KERNEL_ROWS + 1)  # one row, a decode batch, a prefill
        head = llama.output
        return all(fused.applies(r) for r in rows) and isinstance(head, CPUProjection) and all(
            head.kernel_for(r) == "native" for r in rows)

    # ---- text in, text out ---------------------------------------------------------------------
    def reply(self, persona, history, **gen) -> str:
        return self.generate([(persona, history)], **gen)[0].text

    def reply_batch(self, conversations, **gen) -> list[str]:
        return [r.text for r in self.generate(conversations, **gen)]

    def generate(self, conversations, **gen) -> list[Reply]:
        """Reply objects (text, prompt, tokens, finish) for a list of (persona, history)."""
        for _ in self._run(*self.encode(conversations), self.options(**gen), stream=False):
            pass
        return self.last_replies

    def stream(self, persona, history, **gen) -> Iterator[str]:
        """Pieces of the reply as they are decoded; ''.join(them) == reply(persona, history)."""
        for _, piece in self.stream_batch([(persona, history)], **gen):
            yield piece

    def stream_batch(self, conversations, **gen) -> Iterator[tuple[int, str]]:
        """(row, piece) events for a batch; the pieces of a row join to its reply."""
        yield from self._run(*self.encode(conversations), self.options(**gen), stream=True)

    def generate_ids(self, context_ids: Sequence[Sequence[int]], tag_lens: Sequence[int] | None = None,
                     **gen) -> list[Reply]:
        """Generation from ready token ids (the context, bos included; no text formatting).

        tag_lens: tokens of each context's final speaker tag (" R:"), which some layouts place the
        prompt by; default: the tag's tokens for this tokenizer where a context ends with them.
        """
        ids = [list(map(int, c)) for c in context_ids]
        if not ids or any(not c for c in ids):
            raise SPTError("generate_ids: every context needs at least one token")
        if tag_lens is None:
            tag_lens = [self._tag_len(c) for c in ids]
        elif len(tag_lens) != len(ids):
            raise SPTError(f"generate_ids: {len(tag_lens)} tag lengths for {len(ids)} contexts")
        for _ in self._run(ids, list(tag_lens), None, self.options(**gen), stream=False):
            pass
        return self.last_replies

    # ---- internals -------------------------------------------------------------------------------
    def options(self, **gen) -> GenConfig:
        """The validated GenConfig for these keyword options (what every call takes as **gen)."""
        cfg = GenConfig.build(None, **gen)
        cfg.validate(self.config.num_prompts)
        if cfg.stops and self.tokenizer is None:
            raise SPTError("stop strings need a tokenizer; pass stops=() for token-only generation")
        return cfg

    def _tag_len(self, ids: list[int]) -> int:
        if self.tokenizer is None:
            return 0
        if self._tag_ids is None:  # the tag's ids where the encoder puts it, after the context
            self._tag_ids = Encoder(self.tokenizer, self.config.max_len, self.config.prompt_len).tokens(REPLY_TAG)
        n = len(self._tag_ids)
        return n if n and ids[-n:] == self._tag_ids else 0

    def encode(self, conversations) -> tuple[list[list[int]], list[int], list[bool]]:
        """Context ids (the paper's format, oldest turns dropped to fit), their tag lengths, and
        whether each was truncated to fit."""
        if self.tokenizer is None:
            raise SPTError("this engine has no tokenizer: use generate_ids")
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, (list, tuple)):
            raise SPTError("conversations must be a list of (persona, history) pairs")
        if not conversations:
            raise SPTError("no conversations to reply to")
        if self._encoder is None:
            self._encoder = Encoder(self.tokenizer, self.config.max_len, self.config.prompt_len)
        enc = self._encoder
        out, tags, cut = [], [], []
        for i, conv in enumerate(conversations):
            persona, history = _as_conversation(i, conv)
            e = enc.encode(Sample(persona, history, "", "serve", len(history) // 2), with_response=False)
            if e is None:
                head = len(enc.tokens(f"given persona: {' '.join(persona)}; context:"))
                raise SPTError(
                    f"conversation {i}: the persona alone takes {head} tokens, more than the context budget "
                    f"(max_len={self.config.max_len} minus {self.config.prompt_len} prompt tokens); "
                    "shorten the persona")
            out.append(e.context_ids)
            tags.append(e.tag_len)
            cut.append(e.truncated)
        return out, tags, cut

    def stop_table(self, stops) -> StopTable | None:
        if not stops:
            return None
        key = (stops, str(self.device))
        if key not in self._stop_tables:
            if self._pieces is None:  # each token's text: ~0.4 s of decoding, once per engine
                vocab = self.spt.base.get_output_embeddings().weight.shape[0]
                self._pieces = token_pieces(self.tokenizer, vocab)
            table = StopTable(self._pieces, tuple(stops)).to(self.device)
            if len(self._stop_tables) >= 32:  # a bounded memory of stop sets (a server sees many)
                self._stop_tables.pop(next(iter(self._stop_tables)))
            self._stop_tables[key] = table
        return self._stop_tables[key]

    @torch.no_grad()
    def prepare(self, ids: list[list[int]], tag_lens: list[int], gen: GenConfig):
        """Rows [B, T+L, d] with each row's prompt injected, their lengths, and the prompt per row."""
        spt, device = self.spt, self.device
        B, L = len(ids), self.config.prompt_len
        T = max(len(c) for c in ids)
        need = T + L + gen.max_new_tokens
        if need > self.max_positions:
            raise SPTError(f"a context of {T} tokens + {L} prompt tokens + max_new_tokens={gen.max_new_tokens} "
                           f"needs {need} positions; the model has {self.max_positions}")
        padded = torch.full((B, T), self.pad_id, dtype=torch.long)
        for b, c in enumerate(ids):
            padded[b, :len(c)] = torch.tensor(c, dtype=torch.long)
        padded = padded.to(device)
        ctx_len = torch.tensor([len(c) for c in ids], dtype=torch.long, device=device)
        embeds = spt.embed(padded)
        prompts = spt.prompts.weight
        if gen.prompt is not None:
            pick = gen.prompt if isinstance(gen.prompt, (list, tuple)) else [gen.prompt] * B
            if len(pick) != B:
                raise SPTError(f"prompt: {len(pick)} indices for {B} conversations")
            idx = torch.tensor(pick, dtype=torch.long, device=device)
        else:
            # The retriever reads the frozen embeddings of the context (bos excluded), as in training.
            has_bos = self.bos_id is not None and all(c[0] == self.bos_id for c in ids)
            g = torch.Generator().manual_seed(gen.seed) if gen.seed is not None and gen.selection_noise > 0 else None
            idx = spt.select_prompts(embeds, ctx_len, has_bos, gen.selection_noise, g)
        at = spt.prompt_positions(ctx_len, torch.tensor(tag_lens, dtype=torch.long, device=device))
        rows = inject_prompts(embeds, prompts.to(embeds.dtype), torch.arange(B, device=device), idx, at)
        return rows, ctx_len + L, idx

    @torch.no_grad()
    def _run(self, ids: list[list[int]], tag_lens: list[int], truncated: list[bool] | None, gen: GenConfig,
             stream: bool) -> Iterator[tuple[int, str]]:
        device = self.device
        rows, lengths, idx = self.prepare(ids, tag_lens, gen)
        B = rows.shape[0]
        self.last_prompts = idx.tolist()
        self.last_replies = []
        bucket = self.backend.batch_bucket(B)
        if bucket > B:  # padding rows (copies of row 0) keep a compiled step's batch size fixed
            rows = torch.cat([rows, rows[:1].expand(bucket - B, *rows.shape[1:])])
            lengths = torch.cat([lengths, lengths[:1].expand(bucket - B)])
        generator = None
        if not gen.greedy:
            generator = torch.Generator(device=device)
            if gen.seed is None:
                generator.seed()
            else:
                generator.manual_seed(gen.seed)
        stop_table = self.stop_table(gen.stops)
        sync = 1 if stream else gen.check_every or (8 if device.type == "cuda" else 1)
        emitted = [[] for _ in range(B)]
        deltas = [TextDelta(gen.stops) for _ in range(B)] if stream else None
        for chunk in decode_loop(self.backend, rows, lengths, gen, self.eos_id, stop_table, generator, B, sync):
            for b in range(B):
                emitted[b] += chunk[b].tolist()
                if stream:
                    tokens, _ = row_tokens(emitted[b], self.eos_id, gen.ignore_eos)
                    piece = deltas[b].update(self.decode_text(tokens))
                    if piece:
                        yield b, piece
        replies = []
        for b in range(B):
            tokens, finish = row_tokens(emitted[b], self.eos_id, gen.ignore_eos)
            replies.append(self.reply_of(tokens, finish, gen.stops, int(idx[b]), bool(truncated and truncated[b])))
            text = replies[-1].text
            if stream:
                piece = deltas[b].finish(text)
                if piece:
                    yield b, piece
        self.last_replies = replies

    def reply_of(self, tokens: list[int], finish: str, stops, prompt: int, truncated: bool = False) -> Reply:
        """The Reply for a row's generated ids (eos excluded) and why it finished."""
        text = ""
        if self.tokenizer is not None:
            raw = self.decode_text(tokens)
            text = cut_reply(raw, stops)
            if finish == "length" and stops and any(s in raw for s in stops):
                finish = "stop"  # the stop arrived with the very last allowed token
        elif finish == "stop":
            finish = "length"
        return Reply(text, prompt, tokens, finish, truncated)

    def decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
