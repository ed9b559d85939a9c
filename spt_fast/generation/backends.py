"""The two ways the engine runs a model: prefill the rows once, then one step at a time.

- `FastBackend`: the compact Llama (model.llama) with a static per-layer KV cache; its decode step
  (model + sampling + stop check) optionally torch.compile'd, CUDA-graphed on GPU.
- `HFBackend`: any Hugging Face causal LM through `inputs_embeds` and the model's own cache, for
  architectures the compact Llama does not cover.
"""
from __future__ import annotations

import inspect

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


class FastBackend:
    """The compact Llama with static caches; the decode step optionally compiled."""

    name = "spt_fast"
    _count = 0

    def __init__(self, llama, compile: bool = False, nf4: bool = False, freeze: bool = True):
        self.llama = llama
        self.compile = compile
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
              ignore_eos: bool, kv_len: int | None = None, number: int = 0):
        if number < 0:  # never; reading it makes the backend's number a guard of the compiled step
            raise AssertionError(number)
        logits = self.llama.decode_one_token(token, pos, self.caches, kv_len)
        return advance(logits, done, state, eos_id, temperature, top_p, noise, stop_table, ignore_eos)

    def step(self, token, pos, done, state, noise, *args, max_pos: int):
        if not self.compile:
            # Eager: attend only to slots that can be live (a multiple of 16 keeps SDPA shapes tidy).
            return self._step(token, pos, done, state, noise, *args, kv_len=round_up(max_pos + 1, 16))
        if self._compiled is None:
            import contextlib

            import torch._inductor.config as inductor_config

            from ..model.quant import is_quantized

            mode = "reduce-overhead" if token.is_cuda else None
            # bitsandbytes' 4-bit layers may break the graph: allow it there, demand one graph
            # elsewhere (the project's NF4 kernels are custom ops inside the graph).
            fullgraph = self.nf4 or not is_quantized(self.llama)
            # Every engine, batch bucket and cache length is one more graph of the same code object:
            # past dynamo's default limit of 8 a fullgraph compile fails instead of recompiling.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, 4096)
            options = None if token.is_cuda else {"guard_filter_fn": step_guards}
            self._compiled = torch.compile(self._step, mode=mode, options=options, fullgraph=fullgraph,
                                           dynamic=False)
            if token.is_cuda and self.nf4:
                from ..model.quant import NF4Fused

                for m in self.llama.modules():  # CUDA graphs must not copy the weights per replay
                    if isinstance(m, NF4Fused):
                        for b in m.buffers(recurse=False):
                            torch._dynamo.mark_static_address(b)
            self._compile_settings = contextlib.nullcontext()
            if not token.is_cuda and not is_quantized(self.llama) and self.freeze:
                # CPU: freezing makes the weights constants of the step (the one-row product-sums of
                # spt_fast.model.cpu_projections read them in place); for plain nn.Linear layers (no CPU
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
            out = self._compiled(token, pos, done, state, noise, *args, number=self.number)
        # A CUDA graph reuses its output buffers on the next replay: keep copies.
        return tuple(t.clone() for t in out) if token.is_cuda else out


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


