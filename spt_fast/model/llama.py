"""The project's compact Llama forward (gpt-fast style), with the shared-context layout built in.

Weights are Hugging Face Llama weights, unchanged: rotary uses the rotate-half convention of
transformers' Llama, so no q/k permutation is needed on load. Three ways through the blocks:

- `forward`: plain causal self-attention (SDPA) over `inputs_embeds`; right padding is harmless
  because a causal query never sees a later (padded) key.
- `context_pass`: the shared context, once per sample, under no_grad; keeps every layer's K/V.
- `branch_pass`: K*B branches ([P_k][response]) with autograd, each attending to its sample's
  context K/V (stored once, batch B) plus its own causal tokens, via `branch_attention`.

Generation (gpt-fast style): `setup_caches` allocates a static `KVCache` per layer, `prefill` fills
it from right-padded rows, `decode` / `decode_one_token` extend each row at its own positions
(ragged batches need no left padding). spt_fast.generation drives them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ..errors import ModelLoadError
from ..utils import round_up
from ..kernels.branch_attention import branch_attention
from .cpu_linear import recompute_contexts
from .packing import Packing


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig: dim {self.dim}, n_heads {self.n_heads}, n_kv_heads "
                             f"{self.n_kv_heads} must divide evenly")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str) -> "LlamaConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown Llama preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf(cls, hf_config) -> "LlamaConfig":
        """Read a transformers LlamaConfig; anything this forward would compute differently is an error."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type != "llama":
            raise ModelLoadError(f"model_type {model_type!r} is not supported by the fast Llama path "
                                 "(only 'llama'); use the generic prefix path instead")
        # transformers 5 folds rope_scaling into rope_parameters; older versions keep both fields.
        rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ModelLoadError(f"config field rope_scaling (rope_type={rope_type!r}) is not supported by "
                                 "the fast Llama path; only unscaled rotary (rope_scaling=None)")
        for field, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if getattr(hf_config, field, ok) != ok:
                raise ModelLoadError(f"config field {field}={getattr(hf_config, field)!r} is not supported "
                                     f"by the fast Llama path (needs {ok!r})")
        n_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None)
        if head_dim not in (None, hf_config.hidden_size // n_heads):
            raise ModelLoadError(f"config field head_dim={head_dim} != hidden_size/num_attention_heads; "
                                 "not supported by the fast Llama path")
        return cls(
            vocab_size=hf_config.vocab_size, dim=hf_config.hidden_size, n_layers=hf_config.num_hidden_layers,
            n_heads=n_heads, n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or n_heads,
            intermediate_size=hf_config.intermediate_size, rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
            max_seq_len=hf_config.max_position_embeddings,
            tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        )


PRESETS = {
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         intermediate_size=1536, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                       intermediate_size=11008, max_seq_len=4096),
    "llama-2-13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                        intermediate_size=13824, max_seq_len=4096),
    # Same shapes as spt_fast.testing.tiny_llama().
    "tiny": dict(vocab_size=104, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                 max_seq_len=1024),
}


@dataclass
class ContextKV:
    """Per-layer rotated K and V of the shared contexts, [B, Hkv, Tc, D] each, one copy per sample."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    ctx_len: torch.Tensor  # [B] valid context tokens per sample; keys at or past it are padding


class KVCache(nn.Module):
    """Static preallocated cache (gpt-fast): fixed shapes let a compiled decode step keep one graph.

    Slot j of row b holds the K/V of that row's position j, so rows of a ragged batch each write at
    their own positions and a query at position p attends to slots 0..p of its row.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype=torch.bfloat16,
                 device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        # Zeros, not empty: masked slots still enter the attention product as 0 * v, and garbage
        # memory could hold NaN/inf.
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def seq_len(self) -> int:
        return self.k_cache.shape[2]

    def addresses(self) -> tuple[int, int]:
        """(k_cache, v_cache) data pointers: what the C step checks each call (through the buffer
        table directly: Module attribute lookup made that check 35 us of a 2 ms step, 30 layers)."""
        buffers = self._buffers
        return buffers["k_cache"].data_ptr(), buffers["v_cache"].data_ptr()

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows start..stop-1 of this one, sharing its storage: writes go through
        (continuous batching prefills one slot, or decodes the first n, of a larger cache)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k_cache", self.k_cache[start:stop], persistent=False)
        view.register_buffer("v_cache", self.v_cache[start:stop], persistent=False)
        return view

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None):
        """Write k, v [B, Hkv, T, D] at slots pos [T] (every row) or [B, T] (per row; `rows` =
        arange(B)[:, None] if the caller has it, made once for all layers); return the caches."""
        if pos.dim() == 1:
            self.k_cache.index_copy_(2, pos, k.to(self.k_cache.dtype))
            self.v_cache.index_copy_(2, pos, v.to(self.v_cache.dtype))
        else:
            # Indexed assignment, not scatter_: compiled, scatter_ into the cache buffer became a
            # copy of the whole cache per layer (most of a batch-16 CPU step); this writes B*T slots.
            if rows is None:
                rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k_cache[rows, :, pos] = k.transpose(1, 2).to(self.k_cache.dtype)  # indexed: [B, T, Hkv, D]
            self.v_cache[rows, :, pos] = v.transpose(1, 2).to(self.v_cache.dtype)
        return self.k_cache, self.v_cache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 and scale after casting back, as transformers does: bf16 results match.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _apply_rotary(x, cos, sin):
    """x [B, H, T, D]; cos and the sign-folded sin (see Llama._build_rope), fp32 [B, 1, T, D].

    transformers' x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) written as
    roll(x, D/2) = cat(x2, x1) times a sin whose first half is negated: the same numbers bit for
    bit (a sign flip is exact) in one op instead of chunk, neg and cat (eager decode pays per op).
    Rotating in fp32 keeps bf16 positions exact-ish."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


def causal_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def masked_sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def bmm_attention(q, k, v, mask):
    """masked_sdpa's result (additive mask [B, 1, T, S]) as two batched matmuls over the query
    heads grouped by their K/V head (no expanded K/V copies), softmax in fp32. On some CPUs the
    fused kernel is several times slower than this for one query token in bf16: the engine
    measures which to use (cpu_projections.choose_decode_attention)."""
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    scores = torch.matmul(q.reshape(b, hkv, g * t, d), k.transpose(-1, -2)).float() * d ** -0.5
    probs = torch.softmax(scores.view(b, hkv, g, t, s) + mask[:, :, None], dim=-1).to(q.dtype)
    return torch.matmul(probs.view(b, hkv, g * t, s), v).reshape(b, h, t, d)


def grouped_attention(q, k, v, mask):
    """Masked attention written as broadcast products and sums, for a compiled one-row CPU decode step.

    Inductor fuses each product+sum into one vectorised loop that reads K/V once per KV group (no
    expanded copies, nothing materialised); the fused SDPA kernel and small batched matmuls both
    cost several times more per call at one query token. Softmax in fp32. q [B, H, T, D],
    k/v [B, Hkv, S, D], mask bool [B, 1, T, S]. (Eager, this would materialise [.., S, D] products.)
    """
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    qg = q.reshape(b, hkv, g * t, 1, d).float()
    scores = (qg * k[:, :, None].float()).sum(-1) * d ** -0.5  # [B, Hkv, g*T, S]
    keep = mask[:, :, None].expand(b, 1, g, t, s).reshape(b, 1, g * t, s)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    out = (probs[..., None] * v[:, :, None].float()).sum(-2)  # [B, Hkv, g*T, D]
    return out.to(q.dtype).reshape(b, h, t, d)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        # Plain nn.Linear (not one fused wqkv) so quant.quantize_linear_layers can swap each for NF4.
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, kv_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, kv_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.fused_qkv = None  # optional module computing (q, k, v) in one call (quant.attach_nf4_kernels)

    def qkv(self, x, cos, sin):
        """Rotated q [B, H, T, D] and k, v [B, Hkv, T, D]."""
        b, t, _ = x.shape
        q, k, v = self.fused_qkv(x) if self.fused_qkv is not None else (self.wq(x), self.wk(x), self.wv(x))
        q = q.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, attend):
        # `attend(q, k, v) -> [B, H, T, D]` is the one thing the three passes do differently.
        out = attend(*self.qkv(x, cos, sin))
        b, _, t, _ = out.shape
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)  # down
        self.fused_gate_up = None  # optional module computing (gate, up) in one call

    def forward(self, x):
        gate, up = self.fused_gate_up(x) if self.fused_gate_up is not None else (self.w1(x), self.w3(x))
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attend):
        h = x + self.attention(self.attention_norm(x), cos, sin, attend)
        return h + self.feed_forward(self.ffn_norm(h))


# transformers' LlamaForCausalLM parameter names -> ours ({} = layer index).
_HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}


def column_major_linears(model: nn.Module) -> int:
    """Store every dense linear weight column-major: same shape and values, transposed strides.

    On CPU, `F.linear` with a handful of rows (a decode step of a batch) reaches the BLAS's fast
    small-M path only when the weight is column-major: 2-5x faster at 16 rows, the same at 1 and
    at >= 128 rows (MKL, 2-vCPU Xeon; see README). Quantized layers are left alone. The change is
    in place, so models sharing these modules (the HF model behind the compact Llama) see it too.
    Returns how many weights were changed.
    """
    changed = 0
    seen = set()
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, nn.Linear) or type(w) is not nn.Parameter or w.dim() != 2 \
                or not w.dtype.is_floating_point or id(w) in seen:
            continue
        seen.add(id(w))  # tied weights (embedding = LM head) once
        if w.is_contiguous() and w.shape[0] > 1 and w.shape[1] > 1:
            w.data = w.data.t().contiguous().t()
            changed += 1
    return changed


class Llama(nn.Module):
    # Recompute each layer of the branch pass in the backward instead of keeping its activations
    # (SPTModel.set_activation_checkpointing): a 7B step then keeps one layer's worth at a time.
    checkpoint_branches: bool = False

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self._build_rope(self.tok_embeddings.weight.device)
        # An eager decode step's attention (additive mask); the CPU engine may pick bmm_attention, or
        # (native_attention) the C kernel of cpu_native for every one-token step, compiled or not.
        self.decode_attention = masked_sdpa
        self.native_attention = False
        # A prefill's causal attention: PyTorch's SDPA, or (native_prefill_attention, measured by the
        # CPU engine) cpu_native's C kernel.
        self.native_prefill_attention = False
        # Whether a training step's frozen products run on cpu_native's kernel (cpu_linear; set by
        # the SPT model for each step): a checkpointed layer's recompute must run on the same.
        self.native_linears = False
        # One-token steps through cpu_native's whole-step C call (fused_decode.FusedDecode, set by
        # attach_cpu_projections where every projection runs on its kernels).
        self.fused_decode = None

    def _build_rope(self, device):
        # Tables in fp32 for every position up to max_seq_len, with transformers' exact formula.
        d = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device=device) / d))
        freqs = torch.arange(self.config.max_seq_len, dtype=torch.float, device=device)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        # rope_sin has its first half negated: _apply_rotary's roll form of rotate_half needs it.
        self.rope_cos, self.rope_sin = emb.cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)

    def _apply(self, fn, recurse=True):
        # model.to(bf16) would round the rotary tables too; rebuild them in fp32 wherever they went.
        super()._apply(fn, recurse)
        self._build_rope(self.rope_cos.device)
        return self

    def _rope(self, positions, last: int):
        """cos/sin (fp32) for integer positions [T] -> [1, 1, T, D] or [B, T] -> [B, 1, T, D].

        `last` bounds the largest position from shapes alone, so no device sync is needed to check it.
        """
        if last >= self.config.max_seq_len:
            raise ValueError(f"sequence reaches position {last}, past max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        return (cos[None, None], sin[None, None]) if positions.dim() == 1 else (cos[:, None], sin[:, None])

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Causal LM trunk: [B, T, d] embeddings -> [B, T, d] hidden after the final norm."""
        t = inputs_embeds.shape[1]
        if position_ids is None:
            cos, sin = self._rope(torch.arange(t, device=inputs_embeds.device), t - 1)
        else:  # explicit positions: out-of-range ones fail in the table lookup instead
            cos, sin = self._rope(position_ids, 0)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, causal_sdpa)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(hidden)

    @torch.no_grad()
    def context_pass(self, ctx_embeds: torch.Tensor, ctx_len: torch.Tensor) -> ContextKV:
        """Run the shared contexts [B, Tc, d] (right padded to Tc) once; keep each layer's K/V."""
        tc = ctx_embeds.shape[1]
        ctx_len = ctx_len.to(ctx_embeds.device, torch.long)
        ks, vs = [], []

        # No autograd here, so the C kernel can serve where it was measured faster (on the AMD EPYC
        # 3.7 against 10.0 ms a layer of two 470-token contexts in fp32).
        causal = self.causal_attention(ctx_embeds.dtype) if ctx_embeds.device.type == "cpu" else causal_sdpa

        def keep(q, k, v):
            ks.append(k)
            vs.append(v)
            return causal(q, k, v)

        packing = Packing(ctx_len, tc) if Packing.worth_it(ctx_len, tc) else None
        if packing is None:
            h, heads, attend = ctx_embeds, (lambda x: x), keep
            cos, sin = self._rope(torch.arange(tc, device=ctx_embeds.device), tc - 1)
        else:  # K/V are kept padded [B, Hkv, Tc, D] (zeros past ctx_len): the branches read them so
            h, heads, attend = packing.pack(ctx_embeds), packing.unpack_heads, packing.attend(keep)
            cos, sin = self._rope(packing.positions, tc - 1)
        for layer in self.layers[:-1]:
            h = layer(h, cos, sin, attend)
        # The last layer's K/V are all the branches need from it: skip its attention and MLP.
        last = self.layers[-1]
        _, k, v = last.attention.qkv(last.attention_norm(h), cos, sin)
        ks.append(heads(k))
        vs.append(heads(v))
        return ContextKV(ks, vs, ctx_len)

    def branch_pass(self, branch_embeds: torch.Tensor, ctx: ContextKV, sample_of: torch.Tensor,
                    lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Branches [N, Tb, d] after their sample's context: hidden [N, Tb, d] after the final norm.

        Token j of branch n sits at position ctx.ctx_len[sample_of[n]] + j. Right padding is harmless;
        with `lengths` [N] (real tokens per branch) the padding is skipped, and its hidden are 0.
        """
        tb = branch_embeds.shape[1]
        dev = branch_embeds.device
        sample_of = sample_of.to(dev, torch.long)
        positions = ctx.ctx_len[sample_of][:, None] + torch.arange(tb, device=dev)
        packing = None
        if lengths is not None:
            lengths = lengths.to(dev)
        if lengths is not None and Packing.worth_it(lengths, tb):
            packing = Packing(lengths, tb)
            positions = positions.reshape(-1)[packing.index][None]
        # ctx_len <= Tc, so Tc + Tb - 1 bounds every branch position.
        cos, sin = self._rope(positions, ctx.k[0].shape[2] + tb - 1)
        h = branch_embeds if packing is None else packing.pack(branch_embeds)
        recompute = self.checkpoint_branches and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            def attend(q, k, v, i=i):
                return branch_attention(q, k, v, ctx.k[i], ctx.v[i], ctx.ctx_len, sample_of)
            if packing is not None:
                attend = packing.attend(attend)
            if recompute:  # recomputed with the products the first forward ran on (cpu_linear)
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, attend, use_reentrant=False,
                                                      context_fn=lambda: recompute_contexts(self.native_linears))
            else:
                h = layer(h, cos, sin, attend)
        h = self.norm(h)
        return h if packing is None else packing.unpack(h)

    # ---- generation with a static KV cache ---------------------------------------------------
    def setup_caches(self, batch: int, seq_len: int, dtype: torch.dtype | None = None, device=None) -> list[KVCache]:
        """One zeroed KVCache per layer for `batch` rows of up to `seq_len` positions."""
        if seq_len > self.config.max_seq_len:
            raise ValueError(f"cache of {seq_len} positions is past max_seq_len {self.config.max_seq_len}")
        emb = self.tok_embeddings.weight
        cfg = self.config
        return [KVCache(batch, cfg.n_kv_heads, seq_len, cfg.head_dim, dtype or emb.dtype, device or emb.device)
                for _ in range(cfg.n_layers)]

    def prefill(self, inputs_embeds: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Right-padded rows [B, T, d] at positions 0..T-1: fill cache slots 0..T-1, return hidden [B, T, d].

        Padding slots are filled too; a row's later tokens overwrite them before anything attends there.
        On the CPU the whole prefill is one C call where fused_decode serves that many tokens.
        """
        b, t = inputs_embeds.shape[:2]
        pos = torch.arange(t, device=inputs_embeds.device)
        if t > caches[0].seq_len:
            raise ValueError(f"prefill of {t} positions does not fit a cache of {caches[0].seq_len}")
        if self.fused_applies(b * t, inputs_embeds.dtype, caches):  # every token in one C call
            rows = torch.arange(b).repeat_interleave(t)
            return self.fused_decode(inputs_embeds.reshape(b * t, -1), pos.repeat(b), caches, rows).view(b, t, -1)
        cos, sin = self._rope(pos, t - 1)
        causal = self.causal_attention(inputs_embeds.dtype)
        h = inputs_embeds
        for layer, cache in zip(self.layers, caches):
            def attend(q, k, v, cache=cache):
                cache.update(pos, k, v)
                return causal(q, k, v)
            h = layer(h, cos, sin, attend)
        return self.norm(h)

    def causal_attention(self, dtype: torch.dtype):
        """The causal attention of a prefill (q, k, v) -> out: cpu_native's C kernel where
        attach_cpu_projections measured it faster (it takes fp32 or bf16), else PyTorch's SDPA."""
        if self.native_prefill_attention and dtype in (torch.float32, torch.bfloat16):
            from .cpu_native import causal_attention

            return causal_attention
        return causal_sdpa

    def uses_native_attention(self, dtype: torch.dtype) -> bool:
        """Whether one-token rows attend through cpu_native's C kernel (chosen for this view by
        attach_cpu_projections; the kernel takes fp32 or bf16)."""
        return self.native_attention and dtype in (torch.float32, torch.bfloat16)

    def decode(self, inputs_embeds: torch.Tensor, pos: torch.Tensor, caches: list[KVCache],
               kv_len: int | None = None) -> torch.Tensor:
        """Rows [B, T, d] at per-row positions pos [B, T] after what the caches hold: hidden [B, T, d].

        Each token's K/V go to its own slot first, then it attends to slots <= its position of its
        row. Positions must be < kv_len (default: the cache length; not checked, a device value
        would cost a sync). A smaller kv_len skips reading never-used slots; a compiled step keeps
        the default so its shapes never change.
        """
        seq_len = caches[0].seq_len if kv_len is None else min(kv_len, caches[0].seq_len)
        cos, sin = self._rope(pos, seq_len - 1)
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
        if pos.shape[1] == 1 and self.uses_native_attention(inputs_embeds.dtype):
            from .cpu_native import decode_attention

            last = pos[:, 0].contiguous()

            def attention(q, kc, vc):  # reads slots 0..pos of each row only: the whole caches go in
                return decode_attention(q, kc, vc, last)
        else:
            slots = torch.arange(seq_len, device=pos.device)
            mask = slots[None, None, None, :] <= pos[:, None, :, None]  # [B, 1, T, S]
            compiled_cpu = pos.device.type == "cpu" and torch.compiler.is_compiling()
            one_row = compiled_cpu and pos.shape[0] == 1
            masked = grouped_attention if one_row else self.decode_attention
            if not one_row:
                # The additive mask SDPA would make from the boolean one in every layer, made once.
                mask = torch.zeros(mask.shape, dtype=inputs_embeds.dtype, device=pos.device).masked_fill_(
                    ~mask, float("-inf"))

            def attention(q, kc, vc):
                if seq_len < kc.shape[2]:
                    kc, vc = kc[:, :, :seq_len], vc[:, :, :seq_len]
                return masked(q, kc, vc, mask)
        h = inputs_embeds
        for layer, cache in zip(self.layers, caches):
            def attend(q, k, v, cache=cache):
                kc, vc = cache.update(pos, k, v, rows)
                return attention(q, kc, vc)
            h = layer(h, cos, sin, attend)
        return self.norm(h)

    def extend(self, pieces: list[torch.Tensor], starts: list[int], caches: list[KVCache]) -> torch.Tensor:
        """Row r of the caches gets pieces[r] ([n_r, d] embeddings) at positions starts[r]..; one pass
        for all rows: hidden [R, d] of each row's last token.

        What continuous batching runs when requests join: the decoding rows' one token each and the
        new rows' whole prefills go through the projections as one [1, M, d] matrix (one read of the
        weights, and larger GEMMs than one row's prefill), while attention runs per kind of row: the
        one-token rows as one batched call, each longer row alone against its own slots. On the CPU,
        where fused_decode serves that many tokens, the whole pass is its one C call instead.
        """
        dev = pieces[0].device
        n = [p.shape[0] for p in pieces]
        if min(n) < 1:  # a row without a token has no last token to return
            raise ValueError(f"extend: row {n.index(min(n))} has no tokens (each piece needs at least one)")
        last = max(s + k for s, k in zip(starts, n))
        if last > caches[0].seq_len:
            raise ValueError(f"extending to position {last - 1} does not fit a cache of {caches[0].seq_len}")
        if self.fused_applies(sum(n), pieces[0].dtype, caches):  # every token in one C call
            pos = torch.cat([torch.arange(s, s + k) for s, k in zip(starts, n)])
            rows = torch.arange(len(n)).repeat_interleave(torch.tensor(n))
            ends = torch.tensor(n).cumsum(0) - 1
            return self.fused_decode(torch.cat(pieces), pos, caches, rows)[ends]
        one = 0  # rows 0..one-1 add one token each (decode rows come first)
        while one < len(n) and n[one] == 1:
            one += 1
        pos = torch.cat([torch.arange(s, s + k, device=dev) for s, k in zip(starts, n)])
        seq_len = min(round_up(last, 16), caches[0].seq_len)
        cos, sin = self._rope(pos[None], seq_len - 1)
        slots = torch.arange(seq_len, device=dev)
        dec_pos = pos[:one]
        dec_rows = torch.arange(one, device=dev)[:, None]
        native = self.uses_native_attention(pieces[0].dtype)
        if native:  # the C kernel reads each row's slots 0..pos itself: no mask
            from .cpu_native import decode_attention
        else:
            dec_mask = torch.zeros((one, 1, 1, seq_len), dtype=pieces[0].dtype, device=dev).masked_fill_(
                slots[None, None, None, :] > dec_pos[:, None, None, None], float("-inf"))
        bounds = [one]
        for k in n[one:]:
            bounds.append(bounds[-1] + k)
        # A row after a cached prefix: query i (position starts[r] + i) sees slots 0..starts[r] + i.
        # The additive masks are made once here, not from a boolean one in every layer.
        masks = {}
        for r, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]), start=one):
            if starts[r]:
                end = starts[r] + b - a
                masks[r] = torch.zeros((1, 1, b - a, end), dtype=pieces[0].dtype, device=dev).masked_fill_(
                    slots[None, None, None, :end] > pos[None, None, a:b, None], float("-inf"))

        causal = self.causal_attention(pieces[0].dtype)

        def attend(q, k, v, cache):  # q [1, H, M, D], k/v [1, Hkv, M, D]: rows' tokens one after another
            outs = []
            if one:
                kc, vc = cache.update(dec_pos[:, None], k[0, :, :one].transpose(0, 1)[:, :, None],
                                      v[0, :, :one].transpose(0, 1)[:, :, None], dec_rows)
                q_one = q[0, :, :one].transpose(0, 1)[:, :, None]
                if native:  # as decode() runs them: a row's result never depends on the batch
                    out = decode_attention(q_one, kc[:one], vc[:one], dec_pos)
                else:
                    out = masked_sdpa(q_one, kc[:one, :, :seq_len], vc[:one, :, :seq_len], dec_mask)  # [one, H, 1, D]
                outs.append(out[:, :, 0].transpose(0, 1)[None])
            for r, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]), start=one):
                row = cache.rows(r, r + 1)
                kc, vc = row.update(pos[a:b], k[:, :, a:b], v[:, :, a:b])
                end = starts[r] + b - a
                if r in masks:
                    outs.append(masked_sdpa(q[:, :, a:b], kc[:, :, :end], vc[:, :, :end], masks[r]))
                else:
                    outs.append(causal(q[:, :, a:b], kc[:, :, :end], vc[:, :, :end]))
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

        h = torch.cat(pieces)[None]
        for layer, cache in zip(self.layers, caches):
            h = layer(h, cos, sin, lambda q, k, v, cache=cache: attend(q, k, v, cache))
        ends = torch.tensor(list(range(one)) + [b - 1 for b in bounds[1:]], device=dev)
        return self.norm(h[0, ends])

    def fused_applies(self, rows: int, dtype: torch.dtype | None = None, caches=None) -> bool:
        """Whether `rows` tokens (a one-token step of that many rows, a prefill or an extend pass of
        that many tokens) run as fused_decode's one C call (eager only: a compiled step traces the
        layers); with `dtype` / `caches`: only for embeddings / caches of the model's dtype (others
        go layer by layer, as before)."""
        fused = getattr(self, "fused_decode", None)
        if fused is None or rows < 1 or torch.compiler.is_compiling():
            return False
        if (dtype is not None and dtype != fused.dtype) or (caches and caches[0].k_cache.dtype != fused.dtype):
            return False
        return fused.applies(rows)

    def decode_one_token(self, token: torch.Tensor, pos: torch.Tensor, caches: list[KVCache],
                         kv_len: int | None = None) -> torch.Tensor:
        """Next-token logits [B, V] (fp32) for tokens [B] at per-row positions pos [B] (< kv_len)."""
        if self.fused_applies(token.shape[0]):
            if self.fused_decode.applies_head(token.shape[0]):  # the head inside the same C call
                return self.fused_decode(self.tok_embeddings(token), pos, caches, logits=True)
            return self.logits(self.fused_decode(self.tok_embeddings(token), pos, caches)).float()
        h = self.decode(self.tok_embeddings(token)[:, None], pos[:, None], caches, kv_len)
        return self.logits(h[:, 0]).float()

    @classmethod
    def from_hf(cls, hf_model, dtype: torch.dtype | None = None) -> "Llama":
        """Build from a transformers LlamaForCausalLM. Shares its weight storage when dtype is unchanged."""
        config = LlamaConfig.from_hf(hf_model.config)
        names = {}
        for hf, ours in _HF_NAMES.items():
            for i in range(config.n_layers) if "{}" in hf else [None]:
                names[hf.format(i)] = ours.format(i)
        state = {}
        for name, tensor in hf_model.state_dict().items():
            if name not in names:
                raise ModelLoadError(f"unexpected weight {name!r} in the Llama checkpoint (quantized "
                                     "models must be converted before quantizing)")
            if not (config.tie_embeddings and name == "lm_head.weight"):
                state[names[name]] = tensor
        # Built on the meta device, then the real tensors are assigned: no second copy of the weights.
        with torch.device("meta"):
            model = cls(config)
        missing, _ = model.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not (config.tie_embeddings and m == "output.weight")]
        if missing:
            raise ModelLoadError(f"Llama checkpoint lacks weights: {', '.join(missing[:5])}")
        if config.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        model._build_rope(model.tok_embeddings.weight.device)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval().requires_grad_(False)

    @classmethod
    def from_hf_modules(cls, hf_model) -> "Llama":
        """A view of a transformers LlamaForCausalLM that reuses its modules (no copy of anything).

        Unlike `from_hf`, this also works after the HF model's linear layers were swapped for
        bitsandbytes 4-bit ones, and both models keep sharing every weight.
        """
        config = LlamaConfig.from_hf(hf_model.config)
        with torch.device("meta"):
            model = cls(config)
        trunk = hf_model.model
        model.tok_embeddings = trunk.embed_tokens
        model.norm.weight = trunk.norm.weight
        model.output = hf_model.lm_head
        for ours, theirs in zip(model.layers, trunk.layers):
            a, sa = ours.attention, theirs.self_attn
            a.wq, a.wk, a.wv, a.wo = sa.q_proj, sa.k_proj, sa.v_proj, sa.o_proj
            f, mlp = ours.feed_forward, theirs.mlp
            f.w1, f.w3, f.w2 = mlp.gate_proj, mlp.up_proj, mlp.down_proj
            ours.attention_norm.weight = theirs.input_layernorm.weight
            ours.ffn_norm.weight = theirs.post_attention_layernorm.weight
        model._build_rope(trunk.embed_tokens.weight.device)
        return model.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None) -> "Llama":
        """Load a local Hugging Face Llama folder (safetensors) or a .gguf file, through transformers."""
        import os

        from transformers import AutoConfig, AutoModelForCausalLM

        path = str(path)
        kwargs = {}
        if path.endswith(".gguf"):
            path, kwargs["gguf_file"] = os.path.dirname(path) or ".", os.path.basename(path)
        if not os.path.exists(os.path.join(path, kwargs.get("gguf_file", "config.json"))):
            raise ModelLoadError(f"{path}: no Hugging Face model there (no config.json or .gguf file)")
        try:
            LlamaConfig.from_hf(AutoConfig.from_pretrained(path, **kwargs))  # fail before reading weights
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", **kwargs)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: cannot load model: {e}") from e
        return cls.from_hf(hf, dtype)
