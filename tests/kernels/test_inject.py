"""Triton prompt injection vs its PyTorch reference (CPU: TRITON_INTERPRET=1, set in conftest)."""
import pytest
import torch

from spt_fast.kernels import inject as inj
from spt_fast.kernels.inject import inject_prompts, inject_prompts_ref, inject_prompts_triton

# (B, K, T, L, d): one token / one virtual token, the paper's K=4 L=8, Llama's L=1, odd widths.
SHAPES = [
    (1, 1, 1, 1, 16),
    (3, 4, 7, 8, 24),
    (2, 3, 13, 1, 40),
    (4, 2, 5, 3, 33),
]
# "all": every sample under every prompt (N = K*B, training); "selected": one prompt per sample.
# "prefix": the prompt at slot 0; "shared": after each row's context (anywhere in 0..T).
LAYOUTS = ["all-prefix", "all-shared", "selected-shared"]
DTYPES = [(torch.float32, 1e-6, 1e-6), (torch.bfloat16, 1e-2, 0.0)]


def make_inputs(b, k, t, l, d, layout, dtype, device="cpu", seed=0, prompt_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, t, d, generator=gen).to(device=device, dtype=dtype)
    prompts = torch.randn(k, l, d, generator=gen).to(device=device, dtype=prompt_dtype or dtype)
    rows, placement = layout.split("-")
    if rows == "all":
        n = k * b
        row_src, prompt_idx = torch.arange(n) % b, torch.arange(n) // b
    else:
        n = b
        # Shuffled sources: the kernels must follow row_src, not assume row n reads sample n.
        row_src, prompt_idx = torch.randperm(b, generator=gen), torch.randint(0, k, (b,), generator=gen)
    if placement == "prefix":
        pos = torch.zeros(n, dtype=torch.long)
    else:
        pos = torch.randint(0, t + 1, (n,), generator=gen)
        pos[0] = t  # a prompt after the last token
        pos[-1] = 0
    grad_out = torch.randn(n, t + l, d, generator=gen).to(device=device, dtype=dtype)
    index = [x.to(device) for x in (row_src, prompt_idx, pos)]
    return tokens, prompts, *index, grad_out


def run(fn, tokens, prompts, row_src, prompt_idx, pos, grad_out, token_grad=True):
    tokens = tokens.detach().clone().requires_grad_(token_grad)
    prompts = prompts.detach().clone().requires_grad_(True)
    out = fn(tokens, prompts, row_src, prompt_idx, pos)
    leaves = (tokens, prompts) if token_grad else (prompts,)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), *grads


def check(inputs, dtype, atol, rtol, token_grad=True):
    got = run(inject_prompts_triton, *inputs, token_grad=token_grad)
    names = ["out", "d_tokens", "d_prompts"] if token_grad else ["out", "d_prompts"]
    want = run(inject_prompts_ref, *inputs, token_grad=token_grad)
    # The forward is a copy: exact in every dtype.
    assert got[0].dtype == inputs[0].dtype
    assert torch.equal(got[0], want[0])
    if dtype == torch.float32:
        for name, g, w in zip(names[1:], got[1:], want[1:]):
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        return
    # Gradients sum several rows: the kernel adds in fp32, torch in bf16.
    up = [x.float() if x.is_floating_point() else x for x in inputs]
    ref32 = run(inject_prompts_ref, *up, token_grad=token_grad)
    leaf_dtypes = [inputs[0].dtype, inputs[1].dtype] if token_grad else [inputs[1].dtype]
    for name, g, w, s, leaf_dtype in zip(names[1:], got[1:], ref32[1:], want[1:], leaf_dtypes):
        assert g.dtype == leaf_dtype
        kernel_err = (g.float() - w).abs().max().item()
        torch_err = (s.float() - w).abs().max().item()
        assert kernel_err <= 2 * torch_err + atol, f"{name}: kernel err {kernel_err} vs torch {dtype} err {torch_err}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "bf16"])
def test_matches_reference(shape, layout, dtype, atol, rtol):
    check(make_inputs(*shape, layout, dtype), dtype, atol, rtol)


def test_layout_by_hand():
    tokens = torch.arange(2 * 3, dtype=torch.float32).view(2, 3, 1)  # rows [0,1,2], [3,4,5]
    prompts = torch.tensor([[[-1.0], [-2.0]], [[-3.0], [-4.0]]])
    out = inject_prompts_triton(tokens, prompts, torch.tensor([1, 0, 1]), torch.tensor([0, 1, 1]),
                                torch.tensor([0, 3, 2]))
    assert out.squeeze(-1).tolist() == [[-1, -2, 3, 4, 5], [0, 1, 2, -3, -4], [3, 4, -3, -4, 5]]


def test_frozen_tokens_fp32_prompts_into_bf16():
    """The engine's case: frozen bf16 token embeddings, fp32 trainable prompts."""
    inputs = make_inputs(3, 4, 7, 2, 24, "all-shared", torch.bfloat16, prompt_dtype=torch.float32)
    got = run(inject_prompts_triton, *inputs, token_grad=False)
    want = run(inject_prompts_ref, *inputs, token_grad=False)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-2, rtol=1e-2)
    check(inputs, torch.bfloat16, 1e-2, 0.0, token_grad=False)


def test_int32_indices_and_strided_grad():
    tokens, prompts, row_src, prompt_idx, pos, grad_out = make_inputs(2, 3, 6, 2, 16, "all-shared", torch.float32)
    row_src, prompt_idx, pos = (x.to(torch.int32) for x in (row_src, prompt_idx, pos))
    strided = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    got = run(inject_prompts_triton, tokens, prompts, row_src, prompt_idx, pos, strided)
    want = run(inject_prompts_ref, tokens, prompts, row_src, prompt_idx, pos, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("t, l", [(0, 3), (4, 0)], ids=["no-tokens", "no-prompt"])
def test_empty_parts(t, l):
    tokens, prompts, row_src, prompt_idx, pos, grad_out = make_inputs(2, 3, t, l, 16, "all-shared", torch.float32)
    results = []
    for fn in (inject_prompts_triton, inject_prompts_ref):
        leaves = (tokens.clone().requires_grad_(True), prompts.clone().requires_grad_(True))
        out = fn(*leaves, row_src, prompt_idx, pos)
        # An empty part may not reach the graph at all: its gradient is then zeros of its shape.
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
        results.append([out.detach()] + [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)])
    for g, w in zip(*results):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=0, rtol=0)


# Tiles smaller than a row: several slot blocks and width blocks per row.
def test_small_tiles(monkeypatch):
    monkeypatch.setattr(inj, "_pick_blocks", lambda rows, d, on_gpu: (4, 16))
    check(make_inputs(3, 2, 9, 3, 40, "all-shared", torch.float32), torch.float32, 1e-6, 1e-6)


def test_public_dispatch_cpu_is_reference():
    tokens, prompts, row_src, prompt_idx, pos, _ = make_inputs(2, 3, 5, 2, 16, "selected-shared", torch.float32)
    assert torch.equal(inject_prompts(tokens, prompts, row_src, prompt_idx, pos),
                       inject_prompts_triton(tokens, prompts, row_src, prompt_idx, pos))


@pytest.mark.parametrize("field, value, match", [
    ("pos", 6, "prompt_pos"),
    ("idx", 3, "prompt_idx"),
    ("src", -1, "row_src"),
])
def test_bad_indices(field, value, match):
    tokens, prompts, row_src, prompt_idx, pos, _ = make_inputs(2, 3, 5, 2, 16, "selected-shared", torch.float32)
    {"pos": pos, "idx": prompt_idx, "src": row_src}[field][0] = value
    for fn in (inject_prompts_triton, inject_prompts_ref):
        with pytest.raises(ValueError, match=match):
            fn(tokens, prompts, row_src, prompt_idx, pos)


def test_bad_shapes():
    tokens, prompts, row_src, prompt_idx, pos, _ = make_inputs(2, 3, 5, 2, 16, "selected-shared", torch.float32)
    with pytest.raises(ValueError, match="prompts"):
        inject_prompts(tokens, prompts[:, :, :8], row_src, prompt_idx, pos)
    with pytest.raises(ValueError, match="must all be"):
        inject_prompts(tokens, prompts, row_src, prompt_idx[:1], pos)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 4, 300, 8, 2048), (2, 4, 511, 1, 4096)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "bf16"])
def test_gpu_matches_reference(shape, layout, dtype, atol, rtol):
    check(make_inputs(*shape, layout, dtype, device="cuda"), dtype, atol, rtol)
