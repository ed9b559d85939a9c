"""Low-latency SPT generation: `Engine` (Python API) over the compact Llama with a static KV cache.

One generation call, for a batch where every row has its own persona, history and prompt:
1. tokenise each (persona, history) into the paper's context (oldest turns dropped to fit);
2. embed the right-padded contexts once; the retriever scores them from those embeddings
   (pool_context + retrieval: Triton on CUDA) and picks one soft prompt per row;
3. inject each row's prompt into the same embedding buffer: after that row's own context
   (shared layout, ragged per-row positions) or first (prefix layout);
4. prefill the rows once into a static per-layer `KVCache` (the prompt is known before the
   prefill, so one pass covers context and prompt); slot j of a row is its position j, so ragged
   rows need no left padding and each decodes at its own position;
5. decode one token per step for the whole batch. Token choice (greedy / temperature + top-p),
   eos and stop-string detection (a token-level automaton, `decoding.StopTable`) all run on the
   device; the host looks only every `check_every` steps (1 on CPU, 8 on GPU, 1 when streaming),
   and stops early once every row is finished. With `compile=True` the decode step (model +
   sampling + stop check) is one torch.compile'd function, CUDA-graphed on GPU.

Non-Llama models fall back to the Hugging Face forward with its own cache (the calls of
spt_fast.generate, the oracle), with one warning; everything else (sampling, stops, streaming)
is shared.

Input rules: an empty history is allowed (the reply opens the conversation from the persona
alone); a persona that leaves no room in the context budget is an SPTError naming the row; a
context that would run past the model's positions with max_new_tokens is an SPTError too.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .decoding import GenConfig, StopTable, TextDelta, advance, row_tokens
from .errors import SPTError
from .kernels.inject import inject_prompts
from .kernels.retrieval import pool_context
from .metrics import cut_reply


@dataclass
class Reply:
    text: str  # the reply, cut at the first stop string and stripped
    prompt: int  # the soft prompt used (retrieved or forced)
    tokens: list[int]  # generated ids up to the finish (eos excluded)
    finish: str  # "stop" (a stop string), "eos", or "length" (max_new_tokens reached)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---------------------------------------------------------------------------------------------
# backends: prefill rows once, then one step at a time
# ---------------------------------------------------------------------------------------------
def _step_guards(entries) -> list[bool]:
    """Which of dynamo's guards a compiled CPU step keeps (torch.compile's guard_filter_fn).

    Some 4,000 guards walk the model's module tree on every call (~1 ms of a 10 ms CPU step). The
    step's weights are frozen into it and the engine's private view is never restructured, so the
    structural ones go. Kept: everything outside the model (inputs, options, the KV caches) and the
    identity of the view's own rotary table: each engine builds its own view, so that tells engines
    apart, and it retires the graph (a weak reference) when the view it froze is gone.
    """
    return [not (e.name == "self.llama" or e.name.startswith("self.llama."))
            or (e.guard_type == "ID_MATCH" and e.name == "self.llama._buffers['rope_cos']") for e in entries]


class FastBackend:
    """The compact Llama with static caches; the decode step optionally compiled."""

    name = "spt_fast"

    def __init__(self, llama, compile: bool = False, nf4: bool = False):
        self.llama = llama
        self.compile = compile
        self.nf4 = nf4  # NF4 layers run on the project's kernels (no bitsandbytes call in a step)
        self.caches = None
        self._compiled = None
        self._prefill = None
        self._compile_settings = None

    def batch_bucket(self, batch: int) -> int:
        # A compiled graph is specialised on the batch size: round it up to a power of two.
        return 1 << (batch - 1).bit_length() if self.compile else batch

    def _cache_len(self, need: int) -> int:
        return min(_round_up(need, 256 if self.compile else 16), self.llama.config.max_seq_len)

    def prefill(self, rows, lengths, max_new_tokens: int):
        B, T = rows.shape[:2]
        S = self._cache_len(T + max_new_tokens)
        c = self.caches
        if c is None or c[0].k_cache.shape[0] != B or c[0].seq_len != S or c[0].k_cache.dtype != rows.dtype \
                or c[0].k_cache.device != rows.device:
            self.caches = None  # free the old caches before allocating new ones
            self.caches = self.llama.setup_caches(B, S, rows.dtype, rows.device)
            if self.compile:
                for cache in self.caches:  # CUDA graphs need the mutated buffers at fixed addresses
                    torch._dynamo.mark_static_address(cache.k_cache)
                    torch._dynamo.mark_static_address(cache.v_cache)
        if self.compile and rows.is_cuda:
            if self._prefill is None:
                # GPU: an eager prefill of a 7B model is bound by the host launching ~20 ops per
                # layer; compiled (dynamic shapes: one graph for every batch and length, no CUDA
                # graphs since lengths vary) it fuses the elementwise work and launches far less.
                self._prefill = torch.compile(self.llama.prefill, dynamic=True)
            hidden = self._prefill(rows, self.caches)
        else:
            hidden = self.llama.prefill(rows, self.caches)
        last = hidden[torch.arange(B, device=rows.device), lengths - 1]
        return self.llama.logits(last).float()

    def _step(self, token, pos, done, state, noise, temperature: float, top_p: float, stop_table, eos_id: int,
              ignore_eos: bool, kv_len: int | None = None):
        logits = self.llama.decode_one_token(token, pos, self.caches, kv_len)
        return advance(logits, done, state, eos_id, temperature, top_p, noise, stop_table, ignore_eos)

    def step(self, token, pos, done, state, noise, *args, max_pos: int):
        if not self.compile:
            # Eager: attend only to slots that can be live (a multiple of 16 keeps SDPA shapes tidy).
            return self._step(token, pos, done, state, noise, *args, kv_len=_round_up(max_pos + 1, 16))
        if self._compiled is None:
            import contextlib

            import torch._inductor.config as inductor_config

            from .quant import is_quantized

            mode = "reduce-overhead" if token.is_cuda else None
            # bitsandbytes' 4-bit layers may break the graph: allow it there, demand one graph
            # elsewhere (the project's NF4 kernels are custom ops inside the graph).
            fullgraph = self.nf4 or not is_quantized(self.llama)
            # Every engine, batch bucket and cache length is one more graph of the same code object:
            # past dynamo's default limit of 8 a fullgraph compile fails instead of recompiling.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, 4096)
            options = None if token.is_cuda else {"guard_filter_fn": _step_guards}
            self._compiled = torch.compile(self._step, mode=mode, options=options, fullgraph=fullgraph,
                                           dynamic=False)
            if token.is_cuda and self.nf4:
                from .quant import NF4Fused

                for m in self.llama.modules():  # CUDA graphs must not copy the weights per replay
                    if isinstance(m, NF4Fused):
                        for b in m.buffers(recurse=False):
                            torch._dynamo.mark_static_address(b)
            self._compile_settings = contextlib.nullcontext()
            if not token.is_cuda and not is_quantized(self.llama):
                # CPU: freezing makes the weights constants of the step (the one-row product-sums of
                # spt_fast.cpu_decode read them in place); for plain nn.Linear layers (no CPU
                # projections attached) inductor also prepacks them and concat-linear merges q/k/v
                # and gate/up. The step then no longer sees later changes to the base weights.
                # Inductor reads these settings when it
                # compiles, at a call (the first, or a recompile), not at torch.compile (where
                # options={...} leaves freezing off): so every call runs under them (~15 us).
                self._compile_settings = inductor_config.patch(
                    {"freezing": True, "cpp.enable_concat_linear": True})
        if token.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        with self._compile_settings:
            out = self._compiled(token, pos, done, state, noise, *args)
        # A CUDA graph reuses its output buffers on the next replay: keep copies.
        return tuple(t.clone() for t in out) if token.is_cuda else out


class HFBackend:
    """Any Hugging Face causal LM through `inputs_embeds`, with the calls of spt_fast.generate."""

    name = "hf"

    def __init__(self, base):
        self.base = base
        self.cache = None
        self.mask = None

    def batch_bucket(self, batch: int) -> int:
        return batch

    def prefill(self, rows, lengths, max_new_tokens: int):
        from .generate import _cache_of, left_align

        rows, self.mask, positions = left_align(rows, lengths)
        out = self.base(inputs_embeds=rows, attention_mask=self.mask, position_ids=positions, use_cache=True)
        self.cache = _cache_of(out)
        return out.logits[:, -1].float()

    def step(self, token, pos, done, state, noise, temperature, top_p, stop_table, eos_id, ignore_eos, max_pos: int):
        from .generate import _cache_kw, _cache_of

        B = token.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)
        out = self.base(input_ids=token[:, None], attention_mask=self.mask, position_ids=pos[:, None],
                        use_cache=True, **{_cache_kw(self.base): self.cache})
        self.cache = _cache_of(out)
        return advance(out.logits[:, -1].float(), done, state, eos_id, temperature, top_p, noise, stop_table,
                       ignore_eos)


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
    from .data import clean

    return tuple(clean(p) for p in persona if p.strip()), tuple(clean(h) for h in history)


class Engine:
    """Replies from a trained SPT checkpoint, one or many conversations at a time.

    `last_prompts` (and `last_replies`) hold the soft prompt chosen for each row of the latest
    call; for a stream they are set before the first piece of text is yielded.

    On CPU, `cpu_weight_layout=True` (the default) runs the dense layers on oneDNN-packed copies of
    their weights (one more copy of the dense weights in memory; see spt_fast.cpu_decode), and
    column-major weights where those do not apply; False runs the model's own layers as they are.
    `compile=True` on CPU always uses the packed copies.
    """

    def __init__(self, spt, tokenizer=None, device=None, compile: bool = False, cpu_weight_layout: bool = True):
        from .engine import fast_path_problem
        from .llama import Llama, column_major_linears

        from .cpu_decode import attach_cpu_projections
        from .quant import attach_nf4_kernels, guard_4bit, is_quantized

        if device is not None:
            spt.to(device)
        spt.eval()
        if is_quantized(spt.base):
            # Inference must not repack NF4 weights for the CPU kernel: the same model may train later.
            guard_4bit(spt.base)
        self.spt = spt
        self.tokenizer = tokenizer
        self.config = spt.config
        self.compile = compile
        self.nf4_kernels = False
        self.cpu_projections = False
        problem = fast_path_problem(spt.base)
        if problem is None:
            llama = getattr(spt, "fast", None)
            nf4 = spt.device.type == "cuda" and is_quantized(spt.base)
            cpu_dense = spt.device.type == "cpu" and not is_quantized(spt.base) and (compile or cpu_weight_layout)
            if not isinstance(llama, Llama) or nf4 or cpu_dense:
                # A private view where layers get swapped below: the model's own layers (training,
                # the HF path) stay untouched.
                llama = Llama.from_hf_modules(spt.base)
            if nf4:
                # NF4 on GPU: the view computes q/k/v, o, gate/up and down with the project's NF4
                # kernels (one launch per group, bitsandbytes' tensors read in place).
                self.nf4_kernels = attach_nf4_kernels(llama)
            elif cpu_dense:
                # CPU: projections on oneDNN-packed copies of the weights (the prefill, batched and
                # eager decode: 1.2-2x faster than the BLAS here) and, in a compiled step, one row as
                # a streamed product-sum; see spt_fast.cpu_decode.
                self.cpu_projections = attach_cpu_projections(llama)
            if cpu_weight_layout and spt.device.type == "cpu" and not self.cpu_projections:
                # Eager decode multiplies a few rows by every weight; column-major weights take the
                # BLAS's fast path for that on some CPUs (values unchanged; shared with spt.base).
                column_major_linears(llama)
            self.backend = FastBackend(llama, compile=compile, nf4=self.nf4_kernels)
            self.max_positions = llama.config.max_seq_len
        else:
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
        self._stop_tables: dict = {}
        self.last_prompts: list[int] = []
        self.last_replies: list[Reply] = []

    @property
    def fast(self) -> bool:
        return isinstance(self.backend, FastBackend)

    @property
    def device(self) -> torch.device:
        return self.spt.device

    @classmethod
    def from_checkpoint(cls, path, device=None, dtype=None, compile: bool = False, model: str | None = None,
                        load_4bit: bool | None = None, layout: str | None = None) -> "Engine":
        """An engine for a checkpoint (or training output) folder; the base model is the one recorded
        there unless `model` overrides it. dtype: None (as trained), "fp32"/"bf16" or a torch dtype."""
        from .evaluate import load_for_inference

        if isinstance(dtype, torch.dtype):
            names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
            if dtype not in names:
                raise SPTError(f"dtype must be float32 or bfloat16, got {dtype}")
            dtype = names[dtype]
        spt, tok, _ = load_for_inference(str(path), model, dtype, load_4bit, layout)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(spt, tok, device=device, compile=compile)

    # ---- text in, text out ---------------------------------------------------------------------
    def reply(self, persona, history, **gen) -> str:
        return self.generate([(persona, history)], **gen)[0].text

    def reply_batch(self, conversations, **gen) -> list[str]:
        return [r.text for r in self.generate(conversations, **gen)]

    def generate(self, conversations, **gen) -> list[Reply]:
        """Reply objects (text, prompt, tokens, finish) for a list of (persona, history)."""
        for _ in self._run(self.encode(conversations), self.options(**gen), stream=False):
            pass
        return self.last_replies

    def stream(self, persona, history, **gen) -> Iterator[str]:
        """Pieces of the reply as they are decoded; ''.join(them) == reply(persona, history)."""
        for _, piece in self.stream_batch([(persona, history)], **gen):
            yield piece

    def stream_batch(self, conversations, **gen) -> Iterator[tuple[int, str]]:
        """(row, piece) events for a batch; the pieces of a row join to its reply."""
        yield from self._run(self.encode(conversations), self.options(**gen), stream=True)

    def generate_ids(self, context_ids: Sequence[Sequence[int]], **gen) -> list[Reply]:
        """Generation from ready token ids (the context, bos included; no text formatting)."""
        ids = [list(map(int, c)) for c in context_ids]
        if not ids or any(not c for c in ids):
            raise SPTError("generate_ids: every context needs at least one token")
        for _ in self._run(ids, self.options(**gen), stream=False):
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

    def encode(self, conversations) -> list[list[int]]:
        from .data import Sample
        from .text import Encoder

        if self.tokenizer is None:
            raise SPTError("this engine has no tokenizer: use generate_ids")
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, (list, tuple)):
            raise SPTError("conversations must be a list of (persona, history) pairs")
        if not conversations:
            raise SPTError("no conversations to reply to")
        if self._encoder is None:
            self._encoder = Encoder(self.tokenizer, self.config.max_len, self.config.prompt_len)
        enc = self._encoder
        out = []
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
        return out

    def _stop_table(self, stops) -> StopTable | None:
        if not stops:
            return None
        key = (stops, str(self.device))
        if key not in self._stop_tables:
            vocab = self.spt.base.get_output_embeddings().weight.shape[0]
            self._stop_tables[key] = StopTable.for_tokenizer(self.tokenizer, stops, vocab).to(self.device)
        return self._stop_tables[key]

    @torch.no_grad()
    def _prepare(self, ids: list[list[int]], gen: GenConfig):
        """Rows [B, T+L, d] with each row's prompt injected, their lengths, and the prompt per row."""
        spt, device = self.spt, self.device
        B, L, K = len(ids), self.config.prompt_len, self.config.num_prompts
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
        elif K == 1:
            idx = torch.zeros(B, dtype=torch.long, device=device)
        else:
            # The retriever reads the frozen embeddings of the context (bos excluded), as in training.
            has_bos = self.bos_id is not None and all(c[0] == self.bos_id for c in ids)
            feat = pool_context(embeds, ctx_len, 1 if has_bos else 0)
            scores, _, top = spt.retriever(feat, prompts, tau=self.config.tau_sim)
            idx = top[:, 0]
            if gen.selection_noise > 0:
                g = torch.Generator().manual_seed(gen.seed) if gen.seed is not None else None
                jitter = torch.randn(scores.shape, generator=g).to(device)
                idx = (scores + gen.selection_noise * jitter).argmax(-1)
        at = torch.zeros_like(ctx_len) if self.config.layout == "prefix" else ctx_len
        rows = inject_prompts(embeds, prompts.to(embeds.dtype), torch.arange(B, device=device), idx, at)
        return rows, ctx_len + L, idx

    @torch.no_grad()
    def _run(self, ids: list[list[int]], gen: GenConfig, stream: bool) -> Iterator[tuple[int, str]]:
        device = self.device
        rows, lengths, idx = self._prepare(ids, gen)
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
        stop_table = self._stop_table(gen.stops)
        sync = 1 if stream else gen.check_every or (8 if device.type == "cuda" else 1)
        emitted = [[] for _ in range(B)]
        deltas = [TextDelta(gen.stops) for _ in range(B)] if stream else None
        for chunk in decode_loop(self.backend, rows, lengths, gen, self.eos_id, stop_table, generator, B, sync):
            for b in range(B):
                emitted[b] += chunk[b].tolist()
                if stream:
                    tokens, _ = row_tokens(emitted[b], self.eos_id, gen.ignore_eos)
                    piece = deltas[b].update(self._decode(tokens))
                    if piece:
                        yield b, piece
        replies = []
        for b in range(B):
            tokens, finish = row_tokens(emitted[b], self.eos_id, gen.ignore_eos)
            text = ""
            if self.tokenizer is not None:
                raw = self._decode(tokens)
                text = cut_reply(raw, gen.stops)
                if finish == "length" and stop_table is not None and any(s in raw for s in gen.stops):
                    finish = "stop"  # the stop arrived with the very last allowed token
            elif finish == "stop":
                finish = "length"
            replies.append(Reply(text, int(idx[b]), tokens, finish))
            if stream:
                piece = deltas[b].finish(text)
                if piece:
                    yield b, piece
        self.last_replies = replies

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
