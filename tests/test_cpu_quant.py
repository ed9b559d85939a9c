"""The int8 / int4 CPU kernels of spt_fast/model/cpu_quant.c against float64 references."""
import pytest
import torch

from spt_fast.model import cpu_quant

pytestmark = pytest.mark.skipif(cpu_quant.library() is None, reason="the CPU kernels could not be built here")


def _int4_reference(x, q, scale, low, group):
    """x [m, k] times w = q * scale + low (per group of `group` columns), in float64."""
    n, k = q.shape
    w = q.double().reshape(n, k // group, group) * scale.t().double()[..., None] + low.t().double()[..., None]
    return x.double() @ w.reshape(n, k).t()


@pytest.mark.parametrize("m", [1, 2, 3, 5, 17])
@pytest.mark.parametrize("n, k", [(32, 8), (96, 64), (320, 200)])
def test_int8_kernel_is_the_scaled_integer_product(m, n, k):
    torch.manual_seed(m * 1000 + n + k)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) + 0.01
    x = torch.randn(m, k)
    tiles = cpu_quant.pack_int8(q)
    assert torch.equal(cpu_quant.unpack_int8(tiles), q)
    got = cpu_quant.int8_mm(x, tiles, scale)
    want = (x.double() @ q.double().t()) * scale.double()
    # fp32 accumulation of k products of size <= 128 |x|: a relative 1e-5 of the largest output.
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("m", [1, 2, 3, 17])
@pytest.mark.parametrize("n, k, group", [(32, 32, 32), (64, 128, 32), (96, 192, 64), (32, 48, 16)])
def test_int4_kernel_is_the_dequantized_product(m, n, k, group):
    torch.manual_seed(m * 1000 + n + k)
    q = torch.randint(0, 16, (n, k))
    scale, low = torch.rand(k // group, n) * 0.1, torch.randn(k // group, n) * 0.1
    x = torch.randn(m, k)
    words = cpu_quant.pack_int4(q)
    assert torch.equal(cpu_quant.unpack_int4(words), q.int())
    got = cpu_quant.int4_mm(x, words, scale, low, group)
    # With AVX-512 BF16 the kernel rounds x to bf16 first (that is its contract); the rest is fp32.
    xr = x.bfloat16().float() if cpu_quant.int4_rounds_to_bf16() else x
    want = _int4_reference(xr, q, scale, low, group)
    torch.testing.assert_close(got.double(), want, atol=2e-5 * want.abs().max().item(), rtol=0)
    # ... and against the unrounded activations only bf16's error remains.
    exact = _int4_reference(x, q, scale, low, group)
    assert (got.double() - exact).abs().max() <= 1e-2 * exact.abs().max()


def test_kernels_run_inside_a_compiled_graph():
    torch.manual_seed(0)
    q8 = cpu_quant.pack_int8(torch.randint(-128, 128, (64, 64), dtype=torch.int8))
    s8 = torch.rand(64)
    q4 = cpu_quant.pack_int4(torch.randint(0, 16, (64, 64)))
    s4, l4 = torch.rand(2, 64), torch.rand(2, 64)

    def f(x):
        return torch.relu(cpu_quant.int8_mm(x, q8, s8)) + cpu_quant.int4_mm(x * 2, q4, s4, l4, 32)

    x = torch.randn(3, 64)
    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), f(x))


def test_a_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_quant, "_tried", False)
    monkeypatch.setattr(cpu_quant, "_lib", None)
    monkeypatch.setenv("SPT_FAST_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    with pytest.warns(UserWarning, match="building the int8/int4 CPU kernels failed"):
        assert cpu_quant.library() is None
    assert cpu_quant.library() is None  # decided once
    assert not any(tmp_path.rglob("*.so"))  # nothing half-written left behind
    # The projection then uses PyTorch's kernels, with the same result up to their bf16 activations.
    from spt_fast.model.cpu_projections import QuantProjection

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=False)
    proj = QuantProjection([layer], 8, torch.float32)
    assert not proj.native
    x = torch.randn(2, 64)
    torch.testing.assert_close(proj(x), x @ proj.dequantized(torch.float32)[:48].t(), atol=0.05, rtol=0.02)


def test_the_build_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_quant, "_tried", False)
    monkeypatch.setattr(cpu_quant, "_lib", None)
    monkeypatch.setenv("SPT_FAST_CACHE", str(tmp_path))
    assert cpu_quant.library() is not None
    built = list((tmp_path / "cpu_kernels").glob("cpu_quant-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_quant, "_tried", False)
    monkeypatch.setattr(cpu_quant, "_lib", None)
    assert cpu_quant.library() is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
