"""The fused head + CE's two row passes in plain PyTorch, vocabulary chunk by chunk (the CPU path).

Same contract as the Triton `_lse_forward` / `_grad_rows` in fused_ce.py, so the same autograd
Function serves both: nothing V-wide outlives one chunk. The reference (`_ce_math`) instead keeps
K·B·T·V fp32 logits, their log-softmax and, for a bf16 head, an fp32 copy of the head for the
backward: 1.1 GiB on a Llama-2-7B step of K=4, B=8, 32 response tokens, where this keeps ~0.1 GiB.
The price is one more head GEMM (the backward recomputes each chunk's logits).
"""
from __future__ import annotations

import torch

# A chunk's logits hold at most this many fp32 elements (16 MiB), whatever the row count.
_CHUNK_ELEMS = 1 << 22


def _chunks(M: int, V: int):
    step = max(256, _CHUNK_ELEMS // max(M, 1))
    return ((v0, min(V, v0 + step)) for v0 in range(0, V, step))


def _logits(Xf, weight, bias, bscale, v0, v1):
    w = weight[v0:v1].float()  # a view for an fp32 head; one chunk's copy for a bf16 one
    z = Xf @ w.t()
    if bias is not None:
        z.addcmul_(bscale[:, None], bias[v0:v1].float()[None, :])
    return z, w


def _in_chunk(Y, v0, v1):
    rows = ((Y >= v0) & (Y < v1)).nonzero().squeeze(1)
    return rows, Y[rows] - v0


def lse_forward(X, weight, bias, bscale, Y):
    """Per row: lse, target logit, and E_softmax[bias] (zeros without bias). All fp32 [M]."""
    M, V = X.shape[0], weight.shape[0]
    Xf = X.float()
    m = torch.full((M,), float("-inf"), device=X.device)
    s = torch.zeros(M, device=X.device)
    zy = torch.zeros(M, device=X.device)
    eb = torch.zeros(M, device=X.device)
    for v0, v1 in _chunks(M, V):
        z, _ = _logits(Xf, weight, bias, bscale, v0, v1)
        m_new = torch.maximum(m, z.amax(1))
        p = torch.exp(z - m_new[:, None])
        alpha = torch.exp(m - m_new)
        s = s * alpha + p.sum(1)
        if bias is not None:
            eb = eb * alpha + p @ bias[v0:v1].float()
        rows, cols = _in_chunk(Y, v0, v1)
        zy[rows] = z[rows, cols]
        m = m_new
    return m + torch.log(s), zy, (eb / s if bias is not None else eb)


def grad_rows(X, weight, bias, bscale, Y, lse, coef):
    """dX [M, d] fp32 = sum_v coef * (softmax - onehot)[:, v] * W[v], one vocab chunk at a time."""
    M, d = X.shape
    Xf = X.float()
    dX = torch.zeros((M, d), dtype=torch.float32, device=X.device)
    for v0, v1 in _chunks(M, weight.shape[0]):
        z, w = _logits(Xf, weight, bias, bscale, v0, v1)
        g = torch.exp(z.sub_(lse[:, None]))
        rows, cols = _in_chunk(Y, v0, v1)
        g[rows, cols] -= 1.0
        g.mul_(coef[:, None])
        dX.addmm_(g, w)
    return dX
