"""spt_fast.model.cpu_projections: the projections of a compiled CPU decode step against F.linear (eager and
compiled, one row and several, fp32 and bf16, merged q/k/v-style groups), the swap on a private
Llama view, and the engine's compiled batch-1 step against its eager one."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spt_fast import testing
from spt_fast.model.cpu_projections import CPUProjection, attach_cpu_projections, gemv
from spt_fast.model.llama import Llama

# (dtype, atol, rtol): fp32 sums in another order than the BLAS; bf16 rounds the output once (the
# reference is computed in fp32 from the same bf16 values, as both paths accumulate in fp32).
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 1e-2)]
# Odd widths, a group of three (q/k/v), a group of two (gate/up), a single layer; the last two
# are shapes the C kernel takes (outputs a multiple of 16, inputs of 8), the others fall back.
GROUPS = [[(24, 40), (8, 40), (8, 40)], [(33, 17), (33, 17)], [(5, 70)], [(48, 64), (16, 64), (16, 64)],
          [(80, 24)]]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Every CPUProjection instance compiles the same forward: start each test with dynamo's caches
    # empty so its recompile limit counts this test's graphs only.
    torch._dynamo.reset()
    yield


def layers_for(sizes, dtype, seed=0):
    torch.manual_seed(seed)
    return [nn.Linear(k, n, bias=False).to(dtype) for n, k in sizes]


def reference(x, layers):
    return [F.linear(x.float(), m.weight.float()) for m in layers]


def as_list(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("sizes", GROUPS)
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("kernel", ["onednn", "native"])
def test_projection_eager_and_compiled_equal_reference(sizes, rows, dtype, atol, rtol, kernel):
    layers = layers_for(sizes, dtype)
    proj = CPUProjection(layers, kernels={1: kernel, 2: kernel, 3: kernel})
    x = torch.randn(rows, 1, sizes[0][1], generator=torch.Generator().manual_seed(1)).to(dtype)
    want = reference(x, layers)
    with torch.no_grad():
        eager = as_list(proj(x))
        compiled = as_list(torch.compile(proj, dynamic=False, fullgraph=True)(x))
    assert len(eager) == len(compiled) == len(layers)
    for got_e, got_c, ref in zip(eager, compiled, want):
        assert got_e.dtype == got_c.dtype == dtype
        assert got_c.shape == (rows, 1, ref.shape[-1])
        torch.testing.assert_close(got_e.float(), ref, atol=atol, rtol=rtol)
        torch.testing.assert_close(got_c.float(), ref, atol=atol, rtol=rtol)


def test_one_row_gemv_reads_column_major_weights_too():
    layer = layers_for([(12, 20)], torch.float32)[0]
    layer.weight.data = layer.weight.data.t().contiguous().t()  # what an eager engine leaves behind
    proj = CPUProjection([layer])
    assert proj.w0.is_contiguous()
    x = torch.randn(1, 20)
    with torch.no_grad():
        got = torch.compile(proj, dynamic=False)(x)
    torch.testing.assert_close(got, x @ layer.weight.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gemv(x, layer.weight.contiguous()), x @ layer.weight.t(), atol=1e-5, rtol=1e-5)


def test_projection_shares_row_major_weights():
    layers = layers_for([(6, 8), (4, 8)], torch.float32)
    proj = CPUProjection(layers)
    assert proj.w0.data_ptr() == layers[0].weight.data_ptr()
    assert proj.w1.data_ptr() == layers[1].weight.data_ptr()


def test_attach_swaps_the_view_only():
    hf = testing.tiny_llama()
    view = Llama.from_hf_modules(hf)
    x = torch.randn(2, 5, hf.config.hidden_size)
    with torch.no_grad():
        before = view(x)
        assert attach_cpu_projections(view)
        after = view(x)  # eager: the packed oneDNN path (or F.linear without oneDNN)
    assert isinstance(view.layers[0].attention.fused_qkv, CPUProjection)
    assert isinstance(view.output, CPUProjection)
    assert type(hf.model.layers[0].self_attn.o_proj) is nn.Linear
    assert type(hf.lm_head) is nn.Linear
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_attach_refuses_layers_it_does_not_handle():
    hf = testing.tiny_llama()
    hf.model.layers[1].mlp.down_proj.bias = nn.Parameter(torch.zeros(hf.config.hidden_size))
    view = Llama.from_hf_modules(hf)
    assert not attach_cpu_projections(view)
    assert view.layers[0].attention.fused_qkv is None  # nothing half-swapped
    assert type(view.output) is nn.Linear


@pytest.mark.parametrize("native", [True, False])  # this project's int kernels / PyTorch's
@pytest.mark.parametrize("rows", [(1, 3), (3, 20)])  # through the int kernels / dequantised + dense
@pytest.mark.parametrize("bits, dtype", [(8, torch.float32), (8, torch.bfloat16), (4, torch.float32),
                                         (4, torch.bfloat16)])
def test_quantized_projection_equals_its_dequantized_weights(bits, dtype, rows, native, monkeypatch):
    from spt_fast.model import cpu_native
    from spt_fast.model.cpu_projections import QuantProjection

    if native and cpu_native.library() is None:
        pytest.skip("the CPU kernels could not be built here")
    if not native:
        monkeypatch.setattr(cpu_native, "library", lambda: None)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, n, bias=False) for n in (64, 32, 32)]
    proj = QuantProjection(layers, bits, dtype)
    assert proj.native == native
    x = torch.randn(*rows, 64)
    dense_fp32 = rows[0] * rows[1] > proj.KERNEL_ROWS and dtype == torch.float32
    # PyTorch's int kernels take bf16 activations, ours fp32 (int4: bf16 where the CPU has AVX-512 BF16)
    exact = dense_fp32 or (native and dtype == torch.float32 and (bits == 8 or not cpu_native.int4_rounds_to_bf16()))
    atol = 1e-4 if exact else 0.15
    # The dequantized weights, rebuilt from the same rule (int8: per row; int4: groups of 32, bf16
    # scales and offsets).
    w = torch.cat([layer.weight.detach() for layer in layers])
    if bits == 8:
        scale = w.abs().amax(1, keepdim=True) / 127
        deq = torch.round(w / scale).clamp(-128, 127) * scale
    else:
        g = w.reshape(w.shape[0], -1, 32)
        low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((high - low) / 15).bfloat16().float()  # scales and offsets are bf16 values
        low = low.bfloat16().float()
        deq = (torch.round((g - low) / scale).clamp(0, 15) * scale + low).reshape(w.shape)
    want = (x @ deq.t()).split([64, 32, 32], dim=-1)
    got = proj(x.to(dtype))
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape and g_.dtype == dtype
        torch.testing.assert_close(g_.float(), w_, atol=atol, rtol=1e-4 if exact else 0.05)
    # A quantization error there is: the weights are not reproduced exactly.
    assert (deq - w).abs().max() > 1e-4
    # The dense weights a projection gives back (from its tiles where the C prefill keeps no plain
    # copy; PyTorch's int8 kernel keeps its scales in the model's dtype).
    if native or dtype == torch.float32:
        torch.testing.assert_close(proj.dequantized(torch.float32)[:w.shape[0]], deq, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_projection_is_its_integer_product_and_batch_invariant(dtype):
    from spt_fast.model.cpu_projections import W8A8Projection

    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, n, bias=False) for n in (64, 32, 32)]
    proj = W8A8Projection(layers)
    x = torch.randn(5, 64).to(dtype)
    x[2] = 0  # an all-zero row stays zero
    # The reference, from the rule: symmetric int8 per weight row and per activation row, the
    # product of the integers (exact in float64 here), then both scales.
    w = torch.cat([layer.weight.detach() for layer in layers]).double()
    ws = w.abs().amax(1, keepdim=True) / 127
    wq = torch.round(w / ws).clamp(-127, 127)
    xf = x.double()
    xs = xf.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
    xq = torch.round(xf / xs)
    want = (xq @ wq.t()) * xs * ws.t()
    got = torch.cat(proj(x), dim=-1)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output rounded to 8 bits
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    assert got[2].abs().max() == 0
    # Integer products are exact: each row alone gives the very same numbers as the batch.
    alone = torch.cat([torch.cat(proj(x[i:i + 1]), dim=-1) for i in range(5)])
    assert torch.equal(alone, got)
    # ... and there is a quantization error: not the float product.
    assert (got.double() - xf @ w.t()).abs().max() > 1e-3


@pytest.mark.slow
def test_int8_int4_engines_agree_with_the_fp32_engine_on_the_embedded_model():
    """Greedy replies of weight-only int8/int4 (and W8A8) decoding against full precision on the real model:
    the share of generated tokens equal up to each reply's first difference is reported, with a
    floor. (A random tiny model is too flat to say anything: near-ties everywhere.)"""
    from spt_fast.data.corpora import load_samples, split_by_dialog
    from spt_fast.generation.engine import Engine
    from spt_fast.model.build import build_spt_model
    from spt_fast.model.loading import load
    from spt_fast.model.spt import SPTConfig

    base, tok = load("default")
    spt = build_spt_model(base, SPTConfig(num_prompts=2, prompt_len=4, layout="shared", max_len=256), tok)
    held_out = split_by_dialog(load_samples("chitchat"))[1][:6]
    convs = [(s.persona, s.history) for s in held_out]
    opts = dict(max_new_tokens=16, stops=(), ignore_eos=True, prompt=0)
    full = Engine(spt, tok).generate(convs, **opts)
    rates = {}
    for weights in ("int8", "int4", "w8a8"):
        low = Engine(spt, tok, weights=weights).generate(convs, **opts)
        same = sum(next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), len(a.tokens))
                   for a, b in zip(full, low))
        rates[weights] = same / sum(len(a.tokens) for a in full)
    print(f"greedy agreement with fp32: int8 {rates['int8']:.1%}, int4 {rates['int4']:.1%}, "
          f"w8a8 {rates['w8a8']:.1%}")
    assert rates["int8"] >= 0.6 and rates["int4"] >= 0.2 and rates["w8a8"] >= 0.2


def test_kernel_choice_is_measured_once_per_machine_and_shape(tmp_path, monkeypatch):
    from spt_fast.model import cpu_projections as cp

    torch.manual_seed(0)
    projs = [cp.CPUProjection([torch.nn.Linear(64, 96, bias=False)]),
             cp.CPUProjection([torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(64, 32, bias=False)]),
             cp.CPUProjection([torch.nn.Linear(64, 96, bias=False)])]
    timed = []

    def fake(projections, rows, reps=3):
        # Timed over every projection, as a decode step streams them (not one per shape: one
        # layer's weights stay in the last-level cache and favoured the other kernel on a Xeon).
        assert len(projections) == len(timed_over)
        timed.append(rows)
        return {1: {"onednn": 2.0, "blas": 1.0, "native": 1.5}, 16: {"onednn": 1.0, "blas": 3.0, "native": 0.5},
                128: {"onednn": 1.0, "blas": 3.0, "native": 2.0}}[rows]

    timed_over = projs

    monkeypatch.setattr(cp, "_time_kernels", fake)
    cache = tmp_path / "kernels.json"
    want = {1: "blas", 2: "native", 3: "onednn"}
    assert cp.choose_kernels(projs, cache) == want and timed == [1, 16, 128]
    assert cp.choose_kernels(projs, cache) == want and timed == [1, 16, 128]  # from the cache
    other = [cp.CPUProjection([torch.nn.Linear(32, 16, bias=False)])]
    timed_over = other
    cp.choose_kernels(other, cache)
    assert timed == [1, 16, 128, 1, 16, 128] and len(__import__("json").loads(cache.read_text())) == 2
    # Every kernel computes the same projection, for one row, a few and a prefill's many; each
    # keeps only the packed copies its kernels need.
    xs = [torch.randn(n, 64) for n in (1, 4, 40)]
    for p in projs:
        p.use({1: "blas", 2: "blas", 3: "blas"})
        assert p.packed is None and p.native is None
        want_out = [p(x) for x in xs]
        for kernel in ("onednn", "native"):
            p.use({1: kernel, 2: kernel, 3: kernel})
            assert (p.packed is not None) == (kernel == "onednn" and cp._HAS_ONEDNN)
            assert (p.native is not None) == (kernel == "native" and p.native_applies())
            for x, ref in zip(xs, want_out):
                got = p(x)
                for u, v in zip(got if isinstance(got, tuple) else [got], ref if isinstance(ref, tuple) else [ref]):
                    torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_bmm_attention_equals_masked_sdpa(dtype, atol):
    # Grouped heads (9 query heads over 3 K/V heads, as SmolLM2), ragged rows: each row attends to
    # its own prefix of the slots. Tolerances: fp32 rounding; bf16 outputs (values ~1, ulp 2^-7).
    from spt_fast.model.llama import bmm_attention, masked_sdpa

    g = torch.Generator().manual_seed(0)
    b, s = 5, 40
    q = torch.randn(b, 9, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(b, 3, s, 16, generator=g).to(dtype) for _ in range(2))
    pos = torch.tensor([0, 3, 17, 38, 39])
    keep = torch.arange(s)[None, None, None, :] <= pos[:, None, None, None]
    mask = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))
    want, got = masked_sdpa(q, k, v, mask), bmm_attention(q, k, v, mask)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)
    # Row 0 attends to slot 0 alone: its output is that slot's value for every head of the group.
    torch.testing.assert_close(got[0, :3, 0].float(), v[0, 0, 0].float().expand(3, 16), atol=atol, rtol=0)


def _count_measurements(monkeypatch) -> list:
    """The keys of the kernel choices actually measured (not read from the cache file) from now on."""
    from spt_fast.model import cpu_projections as cp

    calls = []
    real = cp.cached_choice

    def counting(cache_file, key, measure):
        def counted():
            calls.append(key)
            return measure()
        return real(cache_file, key, counted)

    monkeypatch.setattr(cp, "cached_choice", counting)
    return calls


def _small_config(n_layers=1):
    from spt_fast.model.llama import LlamaConfig

    return LlamaConfig(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=32, intermediate_size=96,
                       max_seq_len=64)


def test_decode_attention_choice_is_measured_once(tmp_path, monkeypatch):
    from spt_fast.model import cpu_projections as cp
    from spt_fast.model.llama import bmm_attention, masked_sdpa

    cfg = _small_config()
    cache = tmp_path / "kernels.json"
    calls = _count_measurements(monkeypatch)
    first = cp.choose_decode_attention(cfg, torch.bfloat16, cache)
    assert first in ("sdpa", "bmm", "native") and len(calls) == 1
    assert cp.choose_decode_attention(cfg, torch.bfloat16, cache) == first and len(calls) == 1  # from the file
    cp.choose_decode_attention(cfg, torch.float32, cache)  # another dtype: measured too
    assert len(calls) == 2
    # The engine's view uses what was chosen.
    llama = Llama(cfg)
    assert llama.decode_attention is masked_sdpa
    assert not llama.native_attention
    monkeypatch.setattr(cp, "choose_decode_attention", lambda *a, **k: "bmm")
    assert attach_cpu_projections(llama, None, cache) and llama.decode_attention is bmm_attention
    assert not llama.native_attention
    monkeypatch.setattr(cp, "choose_decode_attention", lambda *a, **k: "native")
    native = Llama(cfg)
    assert attach_cpu_projections(native, None, cache) and native.native_attention


def test_prefill_attention_choice_is_measured_once_and_used(tmp_path, monkeypatch):
    from spt_fast.model import cpu_native
    from spt_fast.model import cpu_projections as cp
    from spt_fast.model.llama import causal_sdpa

    cfg = _small_config()
    cache = tmp_path / "kernels.json"
    calls = _count_measurements(monkeypatch)
    first = cp.choose_prefill_attention(cfg, torch.float32, cache)
    built = cpu_native.library() is not None
    assert first in (("sdpa", "native") if built else ("sdpa",)) and len(calls) == int(built)
    assert cp.choose_prefill_attention(cfg, torch.float32, cache) == first and len(calls) == int(built)
    llama = Llama(cfg)
    assert llama.causal_attention(torch.float32) is causal_sdpa
    for choice in ("sdpa", "native"):
        monkeypatch.setattr(cp, "choose_prefill_attention", lambda *a, choice=choice, **k: choice)
        view = Llama(cfg)
        assert attach_cpu_projections(view, None, cache)
        assert view.native_prefill_attention == (choice == "native")
        assert view.causal_attention(torch.float16) is causal_sdpa  # a dtype the C kernel lacks


def test_int_kernel_choice_is_measured_once_and_used(tmp_path, monkeypatch):
    from spt_fast.model import cpu_native
    from spt_fast.model import cpu_projections as cp

    if cpu_native.library() is None:
        pytest.skip("the CPU kernels could not be built here")
    cfg = _small_config(n_layers=2)
    cache = tmp_path / "kernels.json"
    calls = _count_measurements(monkeypatch)
    first = cp.choose_quant_kernels(cfg, 8, torch.bfloat16, cache)
    assert isinstance(first, bool) and len(calls) == 1
    assert cp.choose_quant_kernels(cfg, 8, torch.bfloat16, cache) == first and len(calls) == 1  # from the file
    cp.choose_quant_kernels(cfg, 4, torch.bfloat16, cache)  # int4: its own measurement
    assert len(calls) == 2
    # Where the whole-step C call serves (native attention chosen), the int layers are ours...
    monkeypatch.setattr(cp, "choose_decode_attention", lambda *a, **k: "native")
    monkeypatch.setattr(cp, "choose_quant_kernels", lambda *a, **k: False)
    fused = Llama(cfg)
    assert attach_cpu_projections(fused, "int4", cache) and fused.fused_decode is not None
    assert fused.layers[0].attention.wo.native and fused.output.native
    # ... and elsewhere they follow the choice, each way.
    monkeypatch.setenv("SPT_FAST_FUSED_DECODE", "0")
    for choice in (True, False):
        monkeypatch.setattr(cp, "choose_quant_kernels", lambda *a, choice=choice, **k: choice)
        llama = Llama(cfg)
        assert attach_cpu_projections(llama, "int8", cache)
        assert llama.layers[0].attention.wo.native == choice and llama.output.native == choice
