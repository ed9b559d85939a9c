"""SPT in a layout that shares the context, on the compact Llama forward (DESIGN §3, "shared").

The part of each context before the prompt (`context[:pos]`, the layout's rule) does not depend
on any trainable parameter: it runs once per sample under no_grad (`Llama.context_pass`) and its
KV cache is read by the sample's K branches. Each branch runs only the prompt, the rest of the
context after `pos` (if any) and the response, with autograd, attending to its sample's context
KV plus its own tokens (`Llama.branch_pass`, the branch-attention kernel).
"""
import torch

from ..data.batch import Batch
from ..kernels.inject import inject_prompts
from .cpu_linear import native_linears
from .llama import Llama
from .spt import SPTConfig, SPTModel


class SharedSPTModel(SPTModel):
    """SPT for a context-sharing layout on a Llama-architecture model."""

    def __init__(self, base, config: SPTConfig, tokenizer=None):
        super().__init__(base, config, tokenizer)
        # A view sharing the HF model's modules (no copy); the engine makes its own view.
        self.fast = Llama.from_hf_modules(base)
        self._kernels_for = None  # the dtype the CPU kernels of a step were chosen for
        self._native_linears = False

    def _choose_cpu_kernels(self, dtype: torch.dtype) -> None:
        """The CPU kernels of a training step, each measured once per machine and dtype (and kept):
        the frozen base's products through F.linear or cpu_native's (cpu_linear), and the context
        pass's causal attention through PyTorch's SDPA or cpu_native's (the engine's prefill choice)."""
        if self._kernels_for == dtype:
            return
        from .cpu_linear import choose_training_linears
        from .cpu_projections import choose_prefill_attention
        from .loading import cache_dir

        cache = cache_dir() / "cpu_kernels.json"
        head = self.base.get_output_embeddings()  # (the loss reads the head's weight itself)
        shapes = [m.weight.shape for m in self.base.modules()
                  if isinstance(m, torch.nn.Linear) and m is not head and m.bias is None]
        self._native_linears = choose_training_linears(shapes, dtype, cache)
        self.fast.native_prefill_attention = choose_prefill_attention(self.fast.config, dtype, cache) == "native"
        self._kernels_for = dtype

    def _native_linears_for(self, embeds: torch.Tensor) -> bool:
        """Whether this step's frozen products run on cpu_native's kernel: on the CPU, where chosen."""
        if embeds.device.type != "cpu":
            return False
        self._choose_cpu_kernels(embeds.dtype)
        return self._native_linears

    def set_activation_checkpointing(self, on: bool = True) -> None:
        self.fast.checkpoint_branches = on

    def response_hidden(self, batch: Batch, embeds: torch.Tensor, prompt_idx: torch.Tensor):
        native = self._native_linears_for(embeds)
        self.fast.native_linears = native  # what a checkpointed layer recomputes on
        with native_linears(native):  # the backward's products are in the autograd graph made here
            return self._branches(batch, embeds, prompt_idx)

    def _branches(self, batch: Batch, embeds: torch.Tensor, prompt_idx: torch.Tensor):
        B, T, d = embeds.shape
        N = prompt_idx.shape[0]
        L = self.config.prompt_len
        R = batch.targets.shape[1]
        dev = embeds.device
        ctx_len = batch.ctx_len.to(dev)
        split = self.prompt_positions(ctx_len, batch.tag_len)  # [B]: the shared part is context[:split]
        ctx = self.fast.context_pass(embeds[:, :int(split.max())], split)
        # Branch inputs after the prompt: the context after the split, then every response token
        # but the last (which is only a target). Rows with a shorter tail carry harmless extra
        # tokens at their end (causal attention never looks forward).
        tail = ctx_len - split
        t = torch.arange(int(tail.max()) + R - 1, device=dev)
        where = (split[:, None] + t[None, :]).clamp_max(T - 1)
        rest = torch.gather(embeds, 1, where[:, :, None].expand(B, t.shape[0], d))
        row_src = torch.arange(N, device=dev) % B
        rows = inject_prompts(rest, self.prompts.weight.to(embeds.dtype), row_src, prompt_idx,
                              torch.zeros(N, dtype=torch.long, device=dev))
        # Row n's real tokens: the prompt, its tail and all but the last response token; the rest
        # is padding that branch_pass skips.
        lengths = (L + tail + batch.resp_len.to(dev) - 1).clamp_min(1)[row_src]
        hidden = self.fast.branch_pass(rows, ctx, row_src, lengths)  # [N, L + tail + R - 1, d]
        # Target r of row b is predicted by branch position L + tail_b - 1 + r.
        at = (L + tail[:, None] - 1 + torch.arange(R, device=dev)[None, :])[row_src]  # [N, R]
        out = torch.gather(hidden, 1, at[:, :, None].expand(N, R, hidden.shape[-1]))
        return out.reshape(N // B, B, R, hidden.shape[-1])
