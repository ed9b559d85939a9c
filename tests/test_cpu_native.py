"""The C kernels of spt_fast/model/cpu_native.c (dense fp32 / bf16 and int8 / int4 products, decode
attention) against float64 references."""
import pytest
import torch

from spt_fast.model import cpu_native

pytestmark = pytest.mark.skipif(cpu_native.library() is None, reason="the CPU kernels could not be built here")


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
    tiles = cpu_native.pack_int8(q)
    assert torch.equal(cpu_native.unpack_int8(tiles), q)
    got = cpu_native.int8_mm(x, tiles, scale)
    want = (x.double() @ q.double().t()) * scale.double()
    # fp32 accumulation of k products of size <= 128 |x|: a relative 1e-5 of the largest output.
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("m", [1, 2, 3, 17])
@pytest.mark.parametrize("n, k, group", [(32, 32, 32), (64, 128, 32), (96, 192, 64), (32, 48, 16)])
def test_int4_kernel_is_the_dequantized_product(m, n, k, group):
    torch.manual_seed(m * 1000 + n + k)
    q = torch.randint(0, 16, (n, k))
    # (the kernel reads its scales and offsets as bf16)
    scale, low = (torch.rand(k // group, n) * 0.1).bfloat16(), (torch.randn(k // group, n) * 0.1).bfloat16()
    x = torch.randn(m, k)
    words = cpu_native.pack_int4(q)
    assert torch.equal(cpu_native.unpack_int4(words), q.int())
    got = cpu_native.int4_mm(x, words, cpu_native.pack_int4_groups(scale), cpu_native.pack_int4_groups(low), group)
    scale, low = scale.float(), low.float()
    # With AVX-512 BF16 the kernel rounds x to bf16 first (that is its contract); the rest is fp32.
    xr = x.bfloat16().float() if cpu_native.int4_rounds_to_bf16() else x
    want = _int4_reference(xr, q, scale, low, group)
    torch.testing.assert_close(got.double(), want, atol=2e-5 * want.abs().max().item(), rtol=0)
    # ... and against the unrounded activations only bf16's error remains.
    exact = _int4_reference(x, q, scale, low, group)
    assert (got.double() - exact).abs().max() <= 1e-2 * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 9, 40])
@pytest.mark.parametrize("n, k, group", [(32, 32, 32), (96, 192, 64), (64, 48, 16)])
def test_quant_prefill_is_the_dequantized_product(dtype, bits, m, n, k, group):
    """Many rows against int8 / int4 tiles: the dense product with the weights dequantized in fp32
    (rounded once to bf16 for bf16 rows)."""
    torch.manual_seed(m * 1000 + n + k + bits)
    x = torch.randn(m, k).to(dtype)
    if bits == 8:
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        scale = torch.rand(n) + 0.01
        got = cpu_native.quant_prefill(x, cpu_native.pack_int8(q), scale, None, 0, 8)
        w = q.float() * scale[:, None]
    else:
        q = torch.randint(0, 16, (n, k))
        scale, low = (torch.rand(k // group, n) * 0.1).bfloat16(), (torch.randn(k // group, n) * 0.1).bfloat16()
        got = cpu_native.quant_prefill(x, cpu_native.pack_int4(q), cpu_native.pack_int4_groups(scale),
                                       cpu_native.pack_int4_groups(low), group, 4)
        groups = q.float().reshape(n, k // group, group)
        w = (groups * scale.float().t()[..., None] + low.float().t()[..., None]).reshape(n, k)
    assert got.dtype == dtype and got.shape == (m, n)
    want = x.double() @ w.to(dtype).double().t()  # the weights as the kernel rounds them
    rtol = 0 if dtype == torch.float32 else 2 ** -8  # bf16: the output rounded once
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=rtol)


DENSE_DTYPES = [torch.float32] + ([torch.bfloat16] if cpu_native.library() is not None and
                                  cpu_native.dense_applies(torch.zeros(16, 8, dtype=torch.bfloat16)) else [])


@pytest.mark.parametrize("dtype", DENSE_DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("n, k", [(16, 8), (48, 64), (80, 200), (208, 96)])
def test_dense_kernel_is_the_matrix_product(dtype, m, n, k):
    """Every block shape (rows 1-8 and the remainders past them, 1-3 vectors of 16 outputs)."""
    torch.manual_seed(m * 1000 + n + k)
    w, x = (torch.randn(n, k) / k ** 0.5).to(dtype), torch.randn(m, k).to(dtype)
    packed = cpu_native.pack_dense(w)
    assert torch.equal(cpu_native.unpack_dense(packed, k), w)
    got = cpu_native.dense_mm(x, packed)
    assert got.dtype == dtype and got.shape == (m, n)
    want = x.double() @ w.double().t()  # of the same (bf16-valued) inputs: only the sums' order and
    # the output's rounding differ: fp32 sums, relative 1e-5 of the largest output; bf16 output
    # rounded once (2^-8 relative, half an ulp = 2^-9 of each value, plus the fp32 sums).
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)
    else:
        torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=2 ** -8)


@pytest.mark.parametrize("dtype", DENSE_DTYPES)
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("m", [1, 9, 70])
@pytest.mark.parametrize("n, k", [(16, 8), (48, 64), (80, 200), (208, 96)])
def test_rowmajor_kernel_is_the_matrix_product(dtype, trans, m, n, k):
    """The product on weights as stored ([n, k], or with trans [k, n] for x w), packed per call."""
    if not cpu_native.dense_vector_path(dtype):
        pytest.skip("no vector path for this dtype in this build")
    torch.manual_seed(m * 1000 + n + k + trans)
    w, x = (torch.randn(n, k) / k ** 0.5).to(dtype), torch.randn(m, k).to(dtype)
    stored = w.t().contiguous() if trans else w
    assert cpu_native.rowmajor_applies(x, stored, trans)
    got = cpu_native.dense_mm_rowmajor(x, stored, trans)
    assert got.dtype == dtype and got.shape == (m, n)
    want = x.double() @ w.double().t()  # the same tolerances as the packed kernel (same sums)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)
    else:
        torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=2 ** -8)


def test_rowmajor_kernel_refuses_what_it_cannot_address():
    if not cpu_native.dense_vector_path(torch.float32):
        pytest.skip("no vector path in this build")
    x = torch.randn(4, 64)
    assert not cpu_native.rowmajor_applies(x, torch.randn(40, 64))  # n not a multiple of 16
    assert not cpu_native.rowmajor_applies(x, torch.randn(48, 60))  # k does not match
    assert not cpu_native.rowmajor_applies(x, torch.randn(64, 40), trans=True)
    assert not cpu_native.rowmajor_applies(x.double(), torch.randn(48, 64).double())


def test_dense_kernel_rows_do_not_depend_on_their_neighbours():
    """A row's outputs are its own: poisoning the other rows changes nothing (no row mix-up)."""
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    packed = cpu_native.pack_dense(w)
    x = torch.randn(9, 64)
    base = cpu_native.dense_mm(x, packed)
    y = x.clone()
    y[::2] = float("nan")
    got = cpu_native.dense_mm(y, packed)
    assert torch.equal(got[1::2], base[1::2]) and got[::2].isnan().all()


def test_packed_weights_move_into_one_huge_page_region():
    ts = [torch.randn(100, 7), torch.randint(0, 100, (3000,), dtype=torch.int32), torch.randn(5).bfloat16(),
          torch.randn(600, 1024)]  # > 2 MiB in all: the region is advised for huge pages
    moved = cpu_native.in_huge_pages(ts)
    for a, b in zip(ts, moved):
        assert b.dtype == a.dtype and b.shape == a.shape and torch.equal(a, b)
        assert b.is_contiguous() and b.data_ptr() % 64 == 0 and b.data_ptr() != a.data_ptr()
    assert len({b.untyped_storage().data_ptr() for b in moved}) == 1
    assert moved[0].data_ptr() % (2 << 20) == 0


def test_kernels_run_inside_a_compiled_graph():
    torch.manual_seed(0)
    q8 = cpu_native.pack_int8(torch.randint(-128, 128, (64, 64), dtype=torch.int8))
    s8 = torch.rand(64)
    q4 = cpu_native.pack_int4(torch.randint(0, 16, (64, 64)))
    s4, l4 = torch.rand(2, 64).bfloat16(), torch.rand(2, 64).bfloat16()

    wd = cpu_native.pack_dense(torch.randn(64, 64))

    def f(x):
        return (torch.relu(cpu_native.int8_mm(x, q8, s8)) + cpu_native.int4_mm(x * 2, q4, s4, l4, 32)
                + cpu_native.dense_mm(x - 1, wd))

    x = torch.randn(3, 64)
    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), f(x))


def test_a_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_native, "_tried", False)
    monkeypatch.setattr(cpu_native, "_lib", None)
    monkeypatch.setenv("SPT_FAST_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    with pytest.warns(UserWarning, match="building the CPU kernels of cpu_native.c failed"):
        assert cpu_native.library() is None
    assert cpu_native.library() is None  # decided once
    assert not any(tmp_path.rglob("*.so"))  # nothing half-written left behind
    # The projection then uses PyTorch's kernels, with the same result up to their bf16 activations.
    from spt_fast.model.cpu_projections import QuantProjection

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=False)
    proj = QuantProjection([layer], 8, torch.float32)
    assert not proj.native
    x = torch.randn(2, 64)
    torch.testing.assert_close(proj(x), x @ proj.dequantized(torch.float32)[:48].t(), atol=0.05, rtol=0.02)
    # A dense projection asked for the C kernel takes the BLAS instead.
    from spt_fast.model.cpu_projections import CPUProjection

    dense = CPUProjection([layer])
    dense.use({1: "native", 2: "native", 3: "native"})
    assert dense.native is None and set(dense.kernels.values()) == {"blas"}
    torch.testing.assert_close(dense(x), x @ layer.weight.t())


def test_the_build_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_native, "_tried", False)
    monkeypatch.setattr(cpu_native, "_lib", None)
    monkeypatch.setenv("SPT_FAST_CACHE", str(tmp_path))
    assert cpu_native.library() is not None
    built = list((tmp_path / "native").glob("cpu_native-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_native, "_tried", False)
    monkeypatch.setattr(cpu_native, "_lib", None)
    assert cpu_native.library() is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def _attention_reference(q, k, v, pos):
    """float64 SDPA over slots 0..pos[b] of each row, grouped K/V."""
    mask = torch.arange(k.shape[2])[None, None, None, :] <= pos[:, None, None, None]
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                            enable_gqa=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)])  # bf16: the output's rounding
@pytest.mark.parametrize("b, h, hkv, s, d", [(1, 9, 3, 256, 64), (3, 4, 2, 37, 16), (16, 8, 8, 40, 32),
                                             (2, 4, 1, 700, 16)])
def test_decode_attention_kernel_is_masked_attention(dtype, tol, b, h, hkv, s, d):
    g = torch.Generator().manual_seed(b * 100 + s)
    q = (torch.randn(b, h, 1, d, generator=g) * 2).to(dtype)
    k = (torch.randn(b, hkv, s, d, generator=g) * 2).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    pos = torch.randint(0, s, (b,), generator=g)
    pos[0] = 0  # a row that sees only its first slot
    pos[-1] = s - 1  # ... and one that sees them all
    k_poisoned = k.clone()
    for r in range(b):  # slots past a row's position are never read
        k_poisoned[r, :, pos[r] + 1:] = float("nan")
    assert cpu_native.attention_applies(dtype, h, hkv, d)
    got = cpu_native.decode_attention(q, k_poisoned, v, pos)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), _attention_reference(q, k, v, pos), atol=tol, rtol=tol)


def test_decode_attention_kernel_in_a_compiled_graph():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 2, 24, 16, generator=g), torch.randn(2, 2, 24, 16, generator=g)
    pos = torch.tensor([5, 23])

    def f(q, k, v, pos):
        return cpu_native.decode_attention(q * 0.5, k, v, pos) + 1

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(q, k, v, pos), f(q, k, v, pos))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("b,h,hkv,t,d", [(1, 9, 3, 136, 64), (2, 4, 4, 17, 32), (1, 2, 1, 1, 16), (3, 6, 2, 40, 48)])
def test_causal_attention_kernel_is_causal_sdpa(dtype, tol, b, h, hkv, t, d):
    """Every query block (16 queries) with its diagonal, keys 8 at a time and the rest, GQA."""
    torch.manual_seed(t * 100 + h)
    q, k, v = torch.randn(b, h, t, d).to(dtype), torch.randn(b, hkv, t, d).to(dtype), torch.randn(b, hkv, t, d).to(dtype)
    got = cpu_native.causal_attention(q, k, v)
    assert got.dtype == dtype and got.shape == q.shape
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(h // hkv, 1), v.double().repeat_interleave(h // hkv, 1), is_causal=True)
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    # Causal: a later key changes nothing before it.
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1], v2[:, :, -1] = 100, -100
    again = cpu_native.causal_attention(q, k2, v2)
    assert torch.equal(again[:, :, :-1], got[:, :, :-1])


def test_engine_decode_with_the_native_attention_equals_the_torch_one():
    """The compact Llama's one-token decode: C attention against PyTorch's, fp32, same caches."""
    from spt_fast import testing
    from spt_fast.model.llama import Llama

    hf = testing.tiny_llama(init_std=0.2)
    llama = Llama.from_hf(hf).eval()
    x = torch.randn(3, 7, 64)
    outs = {}
    for native in (False, True):
        llama.native_attention = native
        caches = llama.setup_caches(3, 32, torch.float32)
        with torch.no_grad():
            llama.prefill(x, caches)
            pos = torch.tensor([[7], [7], [7]])
            steps = [llama.decode(torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(i)), pos + i, caches)
                     for i in range(3)]
        outs[native] = torch.stack(steps)
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)


def test_engine_prefill_and_extend_with_the_native_causal_attention_equal_the_torch_one():
    """The compact Llama's prefill (ragged rows, right-padded) and a join pass (Llama.extend: a
    decoding row, a new row from position 0, a row after a cached prefix): C causal attention
    against PyTorch's SDPA, fp32."""
    from spt_fast import testing
    from spt_fast.model.llama import Llama

    hf = testing.tiny_llama(init_std=0.2)
    llama = Llama.from_hf(hf).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 21, 64, generator=g)
    pieces = [torch.randn(1, 64, generator=g), torch.randn(19, 64, generator=g), torch.randn(5, 64, generator=g)]
    outs = {}
    for native in (False, True):
        llama.native_prefill_attention = native
        caches = llama.setup_caches(3, 48, torch.float32)
        with torch.no_grad():
            first = llama.prefill(torch.cat([x, x[:1]]), caches)
            joined = llama.extend(pieces, [21, 0, 21], caches)
        outs[native] = (first, joined)
    for got, want in zip(outs[True], outs[False]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert llama.causal_attention(torch.float32) is cpu_native.causal_attention


def test_an_unloadable_cached_build_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("SPT_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_native, "_tried", False)
    monkeypatch.setattr(cpu_native, "_lib", None)
    target = cpu_native.built_path(cpu_native.find_compiler())
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a shared library")  # e.g. a copy a full disk cut short
    with pytest.warns(UserWarning, match="failed"):
        assert cpu_native.library() is None
    assert not target.exists()
    monkeypatch.setattr(cpu_native, "_tried", False)
    assert cpu_native.library() is not None  # the next run builds it again
    assert target.exists()


def test_a_kernel_without_scratch_memory_raises_rather_than_leaving_its_output_unwritten(monkeypatch):
    """The kernels that allocate scratch report a failed allocation; the operator raises."""
    real = cpu_native.library()

    class NoMemory:  # the real library, except that these kernels report a failed allocation
        def __getattr__(self, name):
            if name in ("spt_causal_attention", "spt_decode_attention", "spt_int4_mm"):
                return lambda *args: 1
            return getattr(real, name)

    monkeypatch.setattr(cpu_native, "library", lambda: NoMemory())
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(MemoryError, match="causal_attention"):
        cpu_native.causal_attention(q, k, k)
    with pytest.raises(MemoryError, match="decode_attention"):
        cpu_native.decode_attention(q[:, :, :1], k, k, torch.tensor([3]))
    words = cpu_native.pack_int4(torch.randint(0, 16, (32, 32)))
    groups = cpu_native.pack_int4_groups(torch.ones(1, 32, dtype=torch.bfloat16))
    with pytest.raises(MemoryError, match="int4_mm"):
        cpu_native.int4_mm(torch.randn(1, 32), words, groups, groups, 32)


def test_argmax_rows_picks_what_torch_argmax_picks():
    # Greedy decoding's choice: the first index of each row's maximum (ties: the lower id), the
    # first NaN where a row has one, 0 for a row of -inf; rows any stride apart, any width.
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(16, 49152, generator=g), torch.randn(7, 130, generator=g)[:, :97]]
    for n in (1, 5, 15, 16, 17, 31, 32, 33, 100):
        cases.append(torch.randint(0, 3, (8, n), generator=g).float())  # many ties
    special = torch.zeros(4, 40)
    special[0, 3] = special[0, 30] = 2.0
    special[1, 20] = special[1, 35] = float("nan")
    special[2] = float("-inf")
    special[3, 39] = float("inf")
    cases.append(special)
    for x in cases:
        assert torch.equal(cpu_native.argmax_rows(x), x.argmax(-1)), x.shape
    assert cpu_native.argmax_rows(special).tolist() == [3, 20, 0, 39]
