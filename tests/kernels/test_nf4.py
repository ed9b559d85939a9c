"""NF4 kernels (kernels/nf4.py) vs their references, and the references vs bitsandbytes itself.

Tolerances, and why:
  * reference dequantization vs bitsandbytes' dequantize_4bit: the same fp32 products -> exact.
  * Triton dequantize vs reference: the same fp32 products (code value x block scale) -> exact in
    fp32; bf16 output: one rounding of the same value -> exact too.
  * Triton gemv vs reference (fp32): different summation order over K only -> atol 1e-5 + rtol 1e-5
    on outputs of magnitude ~1 (K <= 320).
  * bf16 (GPU): bf16 inputs and output (and, for several rows, the dequantized weight rounded to
    bf16 before cuBLAS, as bitsandbytes does) -> relative L2 error <= 1e-2.
"""
import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from spt_fast.kernels import nf4  # noqa: E402
from spt_fast.model.quant import to_nf4  # noqa: E402


def make_layer(n, k, nested=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    lin.weight.data = torch.randn(n, k, generator=g) * 0.02
    if nested:
        layer = to_nf4(lin.to(device), dtype, 64)
    else:
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=False,
                                  quant_type="nf4", device="meta")
        w = bnb.nn.Params4bit(lin.weight.data.to(device), requires_grad=False, blocksize=64,
                              compress_statistics=False, quant_type="nf4", module=layer)
        layer.weight = w._quantize(device)
    return layer


def make_group(sizes, k, nested=True, dtype=torch.float32, device="cpu"):
    layers = [make_layer(n, k, nested, dtype, device, seed=i) for i, n in enumerate(sizes)]
    return layers, nf4.group_from_bnb(layers, dtype)


# (segment sizes, K): one segment, q/k/v-like three with a GQA-sized middle one, rows that do not
# fill a tile, K of one block and of several tiles.
CASES = [([24], 64), ([48, 16, 16], 128), ([40, 33], 192), ([8, 8, 8], 256)]


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_reference_dequantize_equals_bitsandbytes(nested):
    layers, group = make_group([48, 16, 40], 128, nested)
    for layer, seg in zip(layers, group.segments):
        want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        assert torch.equal(nf4.dequantize_segment_ref(group, seg), want)


@pytest.mark.parametrize("sizes,k", CASES)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_dequantize_triton_matches_reference(sizes, k, nested):
    _, group = make_group(sizes, k, nested)
    got = nf4.nf4_dequantize_triton(group, block_n=16, block_k=128)
    assert got.shape == (sum(sizes), k) and got.dtype == torch.float32
    assert torch.equal(got, nf4.nf4_dequantize_ref(group))


@pytest.mark.parametrize("sizes,k", CASES + [([16, 8], 320)])  # K = 5 blocks: a masked last tile
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_gemv_triton_matches_reference(sizes, k, nested):
    _, group = make_group(sizes, k, nested)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)) * 0.5 / 0.02 / k ** 0.5
    got = nf4.nf4_matmul_triton(x, group, block_n=16, block_k=128)
    want = nf4.nf4_matmul_ref(x, group)
    assert got.shape == (1, sum(sizes))
    assert want.abs().max() > 0.1  # a meaningful scale, not near-zero outputs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gemv_rejects_bad_shapes():
    _, group = make_group([16], 64)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        nf4.nf4_matmul_triton(torch.randn(1, 32), group)
    with pytest.raises(ValueError, match="one"):
        nf4.nf4_matmul_triton(torch.randn(2, 64), group)


def test_group_rejects_mixed_widths_and_bias():
    a, b = make_layer(16, 64), make_layer(16, 128)
    with pytest.raises(ValueError, match="share"):
        nf4.group_from_bnb([a, b])
    a.bias = nn.Parameter(torch.zeros(16))
    with pytest.raises(ValueError, match="bias"):
        nf4.group_from_bnb([a])


def test_linear_flattens_leading_dims():
    _, group = make_group([24, 8], 128)
    x = torch.randn(2, 9, 128)
    want = nf4.nf4_matmul_ref(x.reshape(-1, 128), group).reshape(2, 9, 32)
    torch.testing.assert_close(nf4.nf4_linear(x, group), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nf4.nf4_linear(x[:1, :1], group), want[:1, :1], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- GPU (native Triton)

def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_matmul_matches_reference(m, dtype):
    _, group = make_group([512, 128, 128], 1024, True, dtype, "cuda")
    x = (torch.randn(m, 1024, device="cuda") * 3).to(dtype)
    got = nf4.nf4_matmul(x, group)
    want = nf4.nf4_matmul_ref(x.float(), group)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    else:
        assert _rel(got, want) <= 1e-2


@pytest.mark.gpu
def test_gpu_dequantize_and_bitsandbytes_agree():
    layers, group = make_group([256, 64], 512, True, torch.bfloat16, "cuda")
    got = nf4.nf4_dequantize(group)
    want = torch.cat([bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in layers])
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # bitsandbytes' own inference kernel as a second reference
        theirs = torch.cat([m(x) for m in layers], dim=-1)
    assert _rel(nf4.nf4_matmul(x, group), theirs) <= 1e-2
