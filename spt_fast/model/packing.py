"""Run a right-padded batch's token-wise layers on its real tokens only.

A training batch's rows are padded to the longest: with a 468- and a 74-token context, 42% of the
context pass's projections ran on padding, and the branches of a 97- and a 12-token reply 40%.
The projections, norms and MLPs act on each token alone, so the residual stream can be the real
tokens packed into one row [1, M, d]; only attention needs the rows, so q/k/v are scattered into
a zero-padded [N, H, T, D] for it and its output gathered back. The copies cost far less than the
padded GEMMs they save; below `MIN_SAVING` of padding the batch runs padded as before.
"""
from __future__ import annotations

import torch

# Pack only when at least this fraction of the padded tokens would be skipped (the scatter/gather
# around every attention call is not free).
MIN_SAVING = 0.1


class Packing:
    """The real tokens of a right-padded [N, T] batch whose row n holds lengths[n] tokens."""

    def __init__(self, lengths: torch.Tensor, length: int):
        lengths = lengths.clamp(0, length)
        self.rows, self.length = lengths.shape[0], length
        t = torch.arange(length, device=lengths.device)
        keep = (t[None, :] < lengths[:, None]).reshape(-1)
        self.index = keep.nonzero().squeeze(1)  # flat positions n·T + t of the real tokens
        self.positions = (self.index % length)[None]  # [1, M]: each packed token's position in its row

    @staticmethod
    def worth_it(lengths: torch.Tensor, length: int) -> bool:
        padded = lengths.shape[0] * length
        return padded > 0 and 1 - float(lengths.clamp(0, length).sum()) / padded >= MIN_SAVING

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, ...] -> [1, M, ...]"""
        return x.reshape(self.rows * self.length, *x.shape[2:]).index_select(0, self.index)[None]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, M, ...] -> [N, T, ...], zeros at padding."""
        flat = x.new_zeros(self.rows * self.length, *x.shape[2:]).index_copy(0, self.index, x[0])
        return flat.view(self.rows, self.length, *x.shape[2:])

    def unpack_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Attention layout: [1, H, M, D] -> [N, H, T, D], zeros at padding."""
        return self.unpack(x.transpose(1, 2)).transpose(1, 2)

    def pack_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[N, H, T, D] -> [1, H, M, D]"""
        return self.pack(x.transpose(1, 2)).transpose(1, 2)

    def attend(self, attend):
        """An attention callback over packed q/k/v from one over padded rows."""
        def packed(q, k, v):
            return self.pack_heads(attend(self.unpack_heads(q), self.unpack_heads(k), self.unpack_heads(v)))
        return packed
