"""The whole decode step in one C call (spt_fast/model/fused_decode.py, cpu_native.c's
spt_decode_layers) against the layer-by-layer step it replaces, on the same weights and caches."""
import pytest
import torch

from spt_fast.model import cpu_native
from spt_fast.model import cpu_projections as cp
from spt_fast.model.llama import Llama

pytestmark = pytest.mark.skipif(cpu_native.library() is None, reason="the CPU kernels could not be built here")


def _view(monkeypatch, tmp_path, weights, dtype, kernels=None, **shape):
    """A compact Llama view of a tiny random model with the CPU projections, the C kernels chosen.
    shape: tiny_llama's hidden / heads / kv_heads (default: heads of 16, two per K/V head)."""
    from spt_fast import testing

    kernels = kernels or {1: "native", 2: "native", 3: "native"}
    monkeypatch.setattr(cp, "choose_kernels", lambda projections, cache=None: kernels)
    monkeypatch.setattr(cp, "choose_decode_attention", lambda *a, **k: "native")
    hf = testing.tiny_llama(**{"vocab_size": 128, "init_std": 0.2, "layers": 3, "dtype": dtype, **shape})
    llama = Llama.from_hf(hf).eval()
    assert cp.attach_cpu_projections(llama, weights, tmp_path / "kernels.json")
    return llama


def _steps(llama, fused: bool, rows: int, dtype):
    """Logits and caches of three one-token steps after a ragged prefill (rows at different positions)."""
    g = torch.Generator().manual_seed(0)
    keep, llama.fused_decode = llama.fused_decode, llama.fused_decode if fused else None
    try:
        caches = llama.setup_caches(rows, 48, dtype)
        logits = []
        with torch.no_grad():
            llama.prefill(torch.randn(rows, 20, 64, generator=g).to(dtype), caches)
            pos = torch.tensor([19, 13, 7, 16][:rows])  # each row continues at its own position
            for i in range(3):
                token = torch.randint(0, 128, (rows,), generator=g)
                logits.append(llama.decode_one_token(token, pos + i, caches))
        return torch.stack(logits), caches
    finally:
        llama.fused_decode = keep


def _bf16_dense():
    return bool(cpu_native.library().spt_dense_vector() & 2)


# Tolerances: fp32 with fp32 activations (dense, int8): the same sums in another order. int4 rounds
# its activations to bf16 where the CPU has AVX-512 BF16, and bf16 models round every activation:
# there a last-bit difference upstream can move a rounding, so those compare at bf16's precision.
@pytest.mark.parametrize("weights", [None, "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_fused_step_equals_the_layer_by_layer_step(monkeypatch, tmp_path, weights, dtype, rows):
    if dtype == torch.bfloat16 and weights is None and not _bf16_dense():
        pytest.skip("no bf16 dense kernel in this build")
    llama = _view(monkeypatch, tmp_path, weights, dtype)
    assert llama.fused_decode is not None and llama.fused_applies(rows)
    got, got_caches = _steps(llama, True, rows, dtype)
    want, want_caches = _steps(llama, False, rows, dtype)
    exact = dtype == torch.float32 and not (weights == "int4" and cpu_native.int4_rounds_to_bf16())
    tol = dict(atol=2e-5, rtol=2e-5) if exact else dict(atol=0.05 * want.abs().max().item(), rtol=0.02)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(got_caches, want_caches):  # K/V went to the same slots, nothing else written
        torch.testing.assert_close(a.k_cache.float(), b.k_cache.float(), **(tol if exact else dict(atol=0.1, rtol=0.05)))
        torch.testing.assert_close(a.v_cache.float(), b.v_cache.float(), **(tol if exact else dict(atol=0.1, rtol=0.05)))
        assert torch.equal(a.k_cache[:, :, 23:] == 0, b.k_cache[:, :, 23:] == 0)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= (1.0 if exact else 0.8)


@pytest.mark.parametrize("weights", [None, "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [128, 100])
def test_the_lm_head_in_the_c_call_gives_exactly_the_separate_heads_logits(monkeypatch, tmp_path, weights, dtype, vocab):
    """logits=True ends the call with the LM head: bit for bit what the head module gives on the
    call's hidden states, widened to fp32 (1, 3 and 40 rows: 40 runs int heads as dense tiles). A
    dense head over a width its kernel does not take (100) stays a separate call."""
    if dtype == torch.bfloat16 and weights is None and not _bf16_dense():
        pytest.skip("no bf16 dense kernel in this build")
    llama = _view(monkeypatch, tmp_path, weights, dtype, vocab_size=vocab)
    fused = llama.fused_decode
    if weights is None and vocab % cpu_native.VEC:
        assert not fused.applies_head(1)
        return
    g = torch.Generator().manual_seed(1)
    for rows in (1, 3, 40):
        assert fused.applies_head(rows)
        emb = torch.randn(rows, 64, generator=g).to(dtype)
        pos = torch.arange(rows) % 5 + 2
        with torch.no_grad():
            got = fused(emb, pos, llama.setup_caches(rows, 16, dtype), logits=True)
            want = llama.logits(fused(emb, pos, llama.setup_caches(rows, 16, dtype))).float()
        assert got.shape == (rows, vocab) and got.dtype == torch.float32
        assert torch.equal(got, want)


def test_fused_step_rows_do_not_depend_on_the_other_rows(monkeypatch, tmp_path):
    """A row's step alone equals the same row's step in a batch (fp32; the server's decoding rows
    meet different neighbours at every step)."""
    llama = _view(monkeypatch, tmp_path, None, torch.float32)
    together, _ = _steps(llama, True, 3, torch.float32)
    for r in range(3):
        g = torch.Generator().manual_seed(0)
        caches = llama.setup_caches(3, 48, torch.float32)
        with torch.no_grad():
            llama.prefill(torch.randn(3, 20, 64, generator=g), caches)
            pos = torch.tensor([19, 13, 7])
            alone = []
            for i in range(3):
                token = torch.randint(0, 128, (3,), generator=g)
                one = [c.rows(r, r + 1) for c in caches]
                alone.append(llama.decode_one_token(token[r:r + 1], pos[r:r + 1] + i, one)[0])
        torch.testing.assert_close(torch.stack(alone), together[:, r], atol=2e-5, rtol=2e-5)


def test_fused_step_serves_only_where_every_projection_is_on_the_c_kernels(monkeypatch, tmp_path):
    # One row on the C kernels, 2-32 rows on the BLAS: the step serves one row only.
    llama = _view(monkeypatch, tmp_path, None, torch.float32, {1: "native", 2: "blas", 3: "native"})
    assert llama.fused_applies(1) and not llama.fused_applies(3)
    assert _view(monkeypatch, tmp_path, None, torch.float32, {1: "blas", 2: "blas", 3: "blas"}).fused_decode is None
    llama = _view(monkeypatch, tmp_path, "int8", torch.float32)
    assert llama.fused_applies(32) and llama.fused_applies(33)  # more rows: int tiles on the dense kernel
    monkeypatch.setattr(cpu_native, "dense_vector_path", lambda dtype: False)  # no vector path for the tiles
    llama = _view(monkeypatch, tmp_path, "int8", torch.float32)
    assert llama.fused_applies(32) and not llama.fused_applies(33)
    monkeypatch.undo()
    monkeypatch.setenv("SPT_FAST_FUSED_DECODE", "0")
    off = _view(monkeypatch, tmp_path, "int8", torch.float32)
    assert off.fused_decode is None and not off.fused_applies(1)


def test_engine_greedy_output_is_the_same_with_the_fused_step(monkeypatch, tmp_path):
    """Token for token, the engine's greedy replies (eager and compile='auto' alike) with the C step
    and without it, fp32."""
    from spt_fast import testing
    from spt_fast.generation.engine import Engine
    from spt_fast.model.build import build_spt_model
    from spt_fast.model.spt import SPTConfig

    monkeypatch.setattr(cp, "choose_kernels", lambda projections, cache=None: {1: "native", 2: "native", 3: "native"})
    monkeypatch.setattr(cp, "choose_decode_attention", lambda *a, **k: "native")
    hf = testing.tiny_llama(vocab_size=128, init_std=0.2)
    spt = build_spt_model(hf, SPTConfig(num_prompts=2, prompt_len=3, layout="shared"))
    ids = [[5, 9, 33, 17, 8], [40, 2, 77], [12, 13, 14, 15, 16, 17, 18]]
    outs = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("SPT_FAST_FUSED_DECODE", fused)
        engine = Engine(spt, None, compile=False)
        assert (engine.backend.llama.fused_decode is not None) == (fused == "1")
        outs[fused] = engine.generate_ids(ids, [0, 0, 0], max_new_tokens=8, ignore_eos=True, stops=(), prompt=[0, 1, 0])
    assert [r.tokens for r in outs["1"]] == [r.tokens for r in outs["0"]]


def test_fused_step_refuses_caches_and_positions_it_would_address_wrongly(monkeypatch, tmp_path):
    """C addresses every cache slot and rotary row from what it is given: anything that does not fit
    the model is refused before the call."""
    llama = _view(monkeypatch, tmp_path, None, torch.float32)
    fused = llama.fused_decode
    emb = torch.randn(2, 64)
    caches = llama.setup_caches(2, 48, torch.float32)
    fused(emb, torch.tensor([3, 5]), caches)  # fits
    bad = {
        "a cache short": (emb, torch.tensor([3, 5]), caches[:-1]),
        "a position past the cache": (emb, torch.tensor([3, 48]), caches),
        "a negative position": (emb, torch.tensor([-1, 5]), caches),
        "another dtype": (emb.bfloat16(), torch.tensor([3, 5]), caches),
        "fewer cache rows than rows": (emb, torch.tensor([3, 5]), llama.setup_caches(1, 48, torch.float32)),
        "a cache row past the caches": (emb, torch.tensor([3, 5]), caches, torch.tensor([0, 2])),
        "a negative cache row": (emb, torch.tensor([3, 5]), caches, torch.tensor([-1, 0])),
        "cache rows for other tokens": (emb, torch.tensor([3, 5]), caches, torch.tensor([0, 1, 1])),
        "a cache laid out otherwise": (emb, torch.tensor([3, 5]),
                                       caches[:1] + [llama.setup_caches(2, 32, torch.float32)[0]] + caches[2:]),
    }
    for name, args in bad.items():
        with pytest.raises(ValueError, match="fused decode"):
            fused(*args)


# The embedded model's heads (64 wide, three per K/V head: the grouped attention, the vectorised
# rotary) and heads of 128, four per K/V head (too many registers for the grouped attention: one
# head at a time), besides the tiny default (16 wide, two per K/V head).
# (init_std scaled by 1 / sqrt(width) from the tiny model's, so the activations keep its scale)
SHAPES = {"d16-g2": {}, "d64-g3": dict(hidden=192, heads=3, kv_heads=1, init_std=0.2 * (64 / 192) ** 0.5),
          "d128-g4": dict(hidden=512, heads=4, kv_heads=1, init_std=0.2 * (64 / 512) ** 0.5)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("weights", [None, "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extend_pass_in_one_call_equals_the_layer_by_layer_pass(monkeypatch, tmp_path, weights, dtype, shape):
    """The server's joint pass (Llama.extend): two decoding rows, a new row's whole prefill and a
    row continuing after a cached prefix (its first 9 slots already filled), all in one C call,
    against the same pass layer by layer: hidden states and every cache slot. 2 + 25 + 14 tokens:
    more than the int kernels take, so int weights run as dequantized tiles."""
    if dtype == torch.bfloat16 and weights is None and not _bf16_dense():
        pytest.skip("no bf16 dense kernel in this build")
    llama = _view(monkeypatch, tmp_path, weights, dtype, **SHAPES[shape])
    assert llama.fused_applies(41)
    g, dim = torch.Generator().manual_seed(0), llama.config.dim
    prior = torch.randn(4, 12, dim, generator=g).to(dtype)
    pieces = [torch.randn(n, dim, generator=g).to(dtype) for n in (1, 1, 25, 14)]
    starts = [12, 7, 0, 9]
    out = {}
    for fused in (True, False):
        keep, llama.fused_decode = llama.fused_decode, llama.fused_decode if fused else None
        try:
            caches = llama.setup_caches(4, 48, dtype)
            with torch.no_grad():
                llama.prefill(prior, caches)  # slots the continuing rows attend to
                out[fused] = llama.extend(pieces, starts, caches), caches
        finally:
            llama.fused_decode = keep
    (got, got_caches), (want, want_caches) = out[True], out[False]
    exact = dtype == torch.float32
    tol = dict(atol=2e-5, rtol=2e-5) if exact else dict(atol=0.05 * want.float().abs().max().item(), rtol=0.02)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    for a, b in zip(got_caches, want_caches):
        torch.testing.assert_close(a.k_cache.float(), b.k_cache.float(), **(tol if exact else dict(atol=0.1, rtol=0.05)))
        torch.testing.assert_close(a.v_cache.float(), b.v_cache.float(), **(tol if exact else dict(atol=0.1, rtol=0.05)))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tokens_numbers_do_not_depend_on_its_batch(monkeypatch, tmp_path, dtype, shape):
    """Bit for bit, in bf16 too (what lets the server run bf16 and still reply exactly as the
    offline engine): a row's prefill, its decode steps and its logits alone equal the same row's in
    a batch of three, and a row prefilled in a joint pass (Llama.extend, beside decoding rows)
    equals it prefilled alone. The products sum each row in one order whatever block it is in."""
    if dtype == torch.bfloat16 and not _bf16_dense():
        pytest.skip("no bf16 dense kernel in this build")
    llama = _view(monkeypatch, tmp_path, None, dtype, **SHAPES[shape])
    g, dim = torch.Generator().manual_seed(0), llama.config.dim
    prompt = (torch.randn(3, 20, dim, generator=g) * 0.5).to(dtype)
    tokens = torch.randint(0, 128, (3, 3), generator=g)
    with torch.no_grad():
        caches = llama.setup_caches(3, 48, dtype)
        hidden = llama.prefill(prompt, caches)
        steps = [llama.decode_one_token(tokens[:, i], torch.full((3,), 20 + i), caches) for i in range(3)]
        for r in range(3):
            own = llama.setup_caches(1, 48, dtype)
            assert torch.equal(llama.prefill(prompt[r:r + 1], own), hidden[r:r + 1])
            for i in range(3):
                alone = llama.decode_one_token(tokens[r, i:i + 1], torch.full((1,), 20 + i), own)
                assert torch.equal(alone[0], steps[i][r])
        joint = llama.setup_caches(3, 48, dtype)
        llama.prefill(prompt[:2], [c.rows(0, 2) for c in joint])
        out = llama.extend([torch.randn(1, dim, generator=g).to(dtype), torch.randn(1, dim, generator=g).to(dtype),
                            prompt[2]], [20, 20, 0], joint)
        assert torch.equal(out[2], hidden[2, -1])
        assert torch.equal(joint[0].k_cache[2, :, :20], caches[0].k_cache[2, :, :20])
        # Attention takes a row's tokens a few at a time: with other boundaries (7 tokens, then 12
        # after them, then the last one alone) every token still equals the whole prefill's.
        part = llama.setup_caches(1, 48, dtype)
        llama.prefill(prompt[:1, :7], part)
        assert torch.equal(llama.extend([prompt[0, 7:19]], [7], part)[0], hidden[0, 18])
        assert torch.equal(llama.extend([prompt[0, 19:]], [19], part)[0], hidden[0, 19])
        assert torch.equal(part[-1].v_cache[0, :, :20], caches[-1].v_cache[0, :, :20])
