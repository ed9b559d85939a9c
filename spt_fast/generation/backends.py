"""The two ways the engine runs a model: prefill the rows once, then one step at a time.

- `FastBackend`: the compact Llama (model.llama) with a static per-layer KV cache; its decode step
  (model + sampling + stop check) optionally torch.compile'd, CUDA-graphed on GPU.
- `HFBackend`: any Hugging Face causal LM through `inputs_embeds` and the model's own cache, for
  architectures the compact Llama does not cover.
"""
from __future__ import annotations

import copy
import inspect
import threading
import warnings

import torch

from ..utils import round_up
from .decoding import advance


def cache_kwarg(model) -> str:
    # transformers renamed `past_key_values` to `cache` in 5.2x; accept both.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_of(out):
    return out.get("cache", None) if "cache" in out else out.get("past_key_values", None)


def left_align(rows: torch.Tensor, lengths: torch.Tensor):
    """Right-padded [B,S,d] rows -> left-padded rows, attention mask and position ids."""
    B, S = rows.shape[:2]
    shift = S - lengths  # [B]
    src = torch.arange(S, device=rows.device)[None, :] - shift[:, None]  # [B,S]
    mask = src >= 0
    src = src.clamp_min(0)
    aligned = torch.gather(rows, 1, src[:, :, None].expand(B, S, rows.shape[2]))
    aligned = aligned * mask[:, :, None].to(aligned.dtype)
    return aligned, mask.long(), src


def step_guards(entries) -> list[bool]:
    """Which of dynamo's guards a compiled CPU step keeps (torch.compile's guard_filter_fn).

    Some 4,000 guards walk the model's module tree on every call (~1 ms of a 10 ms CPU step). An
    engine's private view is never restructured, so the structural ones go. Kept: everything outside
    the model (inputs, options, the KV caches, the backend's number, which tells engines apart: two
    engines whose models differ in structure, e.g. dense and int8 layers, must never share a graph)
    and the identity of the view's own rotary table where the weights are frozen in.
    """
    return [not (e.name == "self.llama" or e.name.startswith("self.llama."))
            or (e.guard_type == "ID_MATCH" and e.name == "self.llama._buffers['rope_cos']") for e in entries]


def raise_recompile_limits() -> None:
    """Every engine, batch bucket and cache length is one more graph of the step's code object:
    past dynamo's default limit of 8 a fullgraph compile fails instead of recompiling. Dynamo's
    settings are per thread: a compiling thread calls this itself."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)


class FastBackend:
    """The compact Llama with static caches; the decode step optionally compiled."""

    name = "spt_fast"
    _count = 0

    def __init__(self, llama, compile: bool | str = False, nf4: bool = False, freeze: bool = True):
        self.llama = llama
        # True: every step compiled (the first call waits for the compile). "background" (CPU): the
        # first call of each kind of step (batch bucket, cache length, dtype, sampling options) runs
        # eagerly; the kind is compiled before the second call, or between calls (compile_pending).
        self.compile = compile
        self.background = compile == "background"
        self._seen: dict = {}  # background mode: step kind -> inputs of its first (eager) step
        self._ready: set = set()  # ... kinds whose compiled graph exists
        self._failed: set = set()  # ... kinds whose compile failed (they stay eager)
        self._pending: dict = {}  # ... kind -> the thread compiling it (compile_pending)
        self._latched = None  # ... whether the current call runs compiled
        self.nf4 = nf4  # NF4 layers run on the project's kernels (no bitsandbytes call in a step)
        self.caches = None
        self._compiled = None
        self._prefill = None
        self._compile_settings = None
        FastBackend._count += 1
        self.number = FastBackend._count  # a constant of its compiled step (see step_guards)
        # CPU: fold the weights into the compiled step as constants (lets inductor prepack plain
        # nn.Linear layers), or read them as inputs: inductor caches only steps without frozen
        # constants on disk, so only then does a second run skip compiling.
        self.freeze = freeze

    def batch_bucket(self, batch: int) -> int:
        # A compiled graph is specialised on the batch size: round it up to a power of two.
        return 1 << (batch - 1).bit_length() if self.compile else batch

    def _cache_len(self, need: int) -> int:
        return min(round_up(need, 256 if self.compile else 16), self.llama.config.max_seq_len)

    def prefill(self, rows, lengths, max_new_tokens: int):
        self._latched = None
        B, T = rows.shape[:2]
        S = self._cache_len(T + max_new_tokens)
        c = self.caches
        if c is None or c[0].k_cache.shape[0] != B or c[0].seq_len != S or c[0].k_cache.dtype != rows.dtype \
                or c[0].k_cache.device != rows.device:
            self.caches = None  # free the old caches before allocating new ones
            self.caches = self.llama.setup_caches(B, S, rows.dtype, rows.device)
            if self.compile and rows.is_cuda:
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
              ignore_eos: bool, kv_len: int | None = None, number: int = 0):
        if number < 0:  # never; reading it makes the backend's number a guard of the compiled step
            raise AssertionError(number)
        logits = self.llama.decode_one_token(token, pos, self.caches, kv_len)
        return advance(logits, done, state, eos_id, temperature, top_p, noise, stop_table, ignore_eos)

    def step(self, token, pos, done, state, noise, *args, max_pos: int):
        # The whole-step C call (Llama.fused_decode) runs eagerly: nothing is left to compile.
        if not self.compile or self.llama.fused_applies(token.shape[0]):
            return self._eager(token, pos, done, state, noise, *args, max_pos=max_pos)
        if self._compiled is None:
            self._compiled = self._make_compiled(token.is_cuda)
        if self.background:
            if self._latched is None:  # a call decodes all its steps one way: eager or compiled
                self._latched = self._choose(token, pos, done, state, noise, args)
            if not self._latched:
                return self._eager(token, pos, done, state, noise, *args, max_pos=max_pos)
        if token.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        with self._compile_settings:
            out = self._compiled(self, token, pos, done, state, noise, *args, number=self.number)
        # A CUDA graph reuses its output buffers on the next replay: keep copies.
        return tuple(t.clone() for t in out) if token.is_cuda else out

    def _choose(self, token, pos, done, state, noise, args) -> bool:
        """Background mode, a call's first step: True to run the call compiled.

        The first call of a kind runs eagerly (a one-off call is over before a compile would pay);
        the second compiles it (in this thread, now: its first step waits) unless an idle-time
        compile (compile_pending) already did. A call never overlaps a compile: the compiler's
        Python holds the GIL, which an eager step retakes around each of its ~1,600 small ops, and
        on 2 vCPUs a 1.2 s eager reply took 12 s beside one; it waits for it instead.
        """
        self.wait_compiled()
        kind = self._kind(token, noise, args)
        if kind in self._ready:
            return True
        if kind in self._failed:
            return False
        if kind not in self._seen:
            self._seen[kind] = (tuple(None if t is None else t.clone() for t in (token, pos, done, state, noise)),
                                args)
            return False
        # Compile now on scratch caches (the step must not run twice on the real ones).
        self._compile(kind, *self._seen[kind])
        return kind in self._ready

    def compile_pending(self) -> None:
        """Compile, in a second thread, every kind of step that has run eagerly so far: for callers
        with idle time between calls (chat, while the user types). A call that starts before it is
        done waits for it."""
        for kind, (inputs, args) in list(self._seen.items()):
            if kind not in self._ready and kind not in self._failed and kind not in self._pending:
                thread = threading.Thread(target=self._compile, args=(kind, inputs, args), name="spt-fast-compile",
                                          daemon=True)
                self._pending[kind] = thread
                thread.start()

    def _compile(self, kind, inputs, args) -> None:
        """Compile one kind of step by running it once on a shadow backend (same model and number,
        scratch caches of the same shape): the graph then serves this backend, whose caches are
        guarded by shape only. A failure warns and leaves that kind eager."""
        shadow = copy.copy(self)
        shadow.caches = self.llama.setup_caches(kind[0], kind[1], kind[2], inputs[0].device)
        try:
            raise_recompile_limits()  # (dynamo's settings are per thread)
            with torch.no_grad(), self._compile_settings:
                self._compiled(shadow, *inputs, *args, number=self.number)
            self._ready.add(kind)
        except Exception as exc:  # noqa: BLE001 - any compile failure leaves eager steps
            self._failed.add(kind)
            warnings.warn(f"compiling the decode step failed ({type(exc).__name__}: {exc}); decoding stays eager",
                          stacklevel=2)

    def _eager(self, token, pos, done, state, noise, *args, max_pos: int):
        # Attend only to slots that can be live (a multiple of 16 keeps SDPA shapes tidy).
        return self._step(token, pos, done, state, noise, *args, kv_len=round_up(max_pos + 1, 16))

    def _kind(self, token, noise, args) -> tuple:
        """What a compiled step is specialised on: shapes of the batch and caches, dtype, and the
        sampling options (constants of the graph)."""
        temperature, top_p, table, eos_id, ignore_eos = args
        c = self.caches[0].k_cache
        return (token.shape[0], c.shape[2], c.dtype, noise is None, None if table is None else tuple(table.shape),
                float(temperature), float(top_p), int(eos_id), bool(ignore_eos))

    @property
    def compiling(self) -> bool:
        """A background compile is running."""
        return any(t.is_alive() for t in self._pending.values())

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for the background compiles started so far; True once none is running."""
        for thread in list(self._pending.values()):
            thread.join(timeout)
        return not any(t.is_alive() for t in self._pending.values())

    def _make_compiled(self, cuda: bool):
        import contextlib

        import torch._inductor.config as inductor_config

        from ..model.quant import is_quantized

        mode = "reduce-overhead" if cuda else None
        # bitsandbytes' 4-bit layers may break the graph: allow it there, demand one graph
        # elsewhere (the project's NF4 kernels are custom ops inside the graph).
        fullgraph = self.nf4 or not is_quantized(self.llama)
        raise_recompile_limits()
        options = None if cuda else {"guard_filter_fn": step_guards}
        # The unbound function, the backend an argument: a background compile traces it with a
        # shadow backend (scratch caches) and the same graph then serves this one.
        compiled = torch.compile(FastBackend._step, mode=mode, options=options, fullgraph=fullgraph, dynamic=False)
        if cuda and self.nf4:
            from ..model.quant import NF4Fused

            for m in self.llama.modules():  # CUDA graphs must not copy the weights per replay
                if isinstance(m, NF4Fused):
                    for b in m.buffers(recurse=False):
                        torch._dynamo.mark_static_address(b)
        self._compile_settings = contextlib.nullcontext()
        if not cuda and not is_quantized(self.llama) and self.freeze:
            # CPU: freezing makes the weights constants of the step (the one-row product-sums of
            # spt_fast.model.cpu_projections read them in place); for plain nn.Linear layers (no CPU
            # projections attached) inductor also prepacks them and concat-linear merges q/k/v
            # and gate/up. The step then no longer sees later changes to the base weights.
            # Inductor reads these settings when it compiles, at a call (the first, or a recompile),
            # not at torch.compile (where options={...} leaves freezing off): so every call runs
            # under them (~15 us).
            self._compile_settings = inductor_config.patch({"freezing": True, "cpp.enable_concat_linear": True})
        return compiled


class HFBackend:
    """Any Hugging Face causal LM through `inputs_embeds` and its own cache."""

    name = "hf"

    def __init__(self, base):
        self.base = base
        self.cache = None
        self.mask = None

    def batch_bucket(self, batch: int) -> int:
        return batch

    def prefill(self, rows, lengths, max_new_tokens: int):
        rows, self.mask, positions = left_align(rows, lengths)
        out = self.base(inputs_embeds=rows, attention_mask=self.mask, position_ids=positions, use_cache=True)
        self.cache = cache_of(out)
        return out.logits[:, -1].float()

    def step(self, token, pos, done, state, noise, temperature, top_p, stop_table, eos_id, ignore_eos, max_pos: int):
        B = token.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)
        out = self.base(input_ids=token[:, None], attention_mask=self.mask, position_ids=pos[:, None],
                        use_cache=True, **{cache_kwarg(self.base): self.cache})
        self.cache = cache_of(out)
        return advance(out.logits[:, -1].float(), done, state, eos_id, temperature, top_p, noise, stop_table,
                       ignore_eos)


