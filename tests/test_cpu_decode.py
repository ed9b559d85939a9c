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
# Odd widths, a group of three (q/k/v), a group of two (gate/up), a single layer.
GROUPS = [[(24, 40), (8, 40), (8, 40)], [(33, 17), (33, 17)], [(5, 70)]]


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
@pytest.mark.parametrize("rows", [1, 3])
def test_projection_eager_and_compiled_equal_reference(sizes, rows, dtype, atol, rtol):
    layers = layers_for(sizes, dtype)
    proj = CPUProjection(layers)
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
