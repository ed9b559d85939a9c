"""Padding encoded samples into one batch: context + response ids, right-padded."""
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """A dynamically padded batch: context+response token ids, right-padded."""

    input_ids: torch.Tensor  # [B, T]
    ctx_len: torch.Tensor  # [B]
    resp_len: torch.Tensor  # [B]
    targets: torch.Tensor  # [B, R], -100 beyond resp_len
    persona_keys: list
    turns: list
    has_bos: bool
    tag_len: torch.Tensor | None = None  # [B] tokens of the context's final speaker tag (" R:")

    def __post_init__(self):
        if self.tag_len is None:
            self.tag_len = torch.zeros_like(self.ctx_len)

    def to(self, device) -> "Batch":
        for name in ("input_ids", "ctx_len", "resp_len", "targets", "tag_len"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def collate(encoded: list, pad_id: int, bos_id: int | None) -> Batch:
    B = len(encoded)
    ctx = [e.context_ids for e in encoded]
    resp = [e.response_ids for e in encoded]
    T = max(len(c) + len(r) for c, r in zip(ctx, resp))
    R = max(1, max(len(r) for r in resp))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, R), -100, dtype=torch.long)
    for b, (c, r) in enumerate(zip(ctx, resp)):
        ids[b, : len(c) + len(r)] = torch.tensor(c + r, dtype=torch.long)
        if r:
            targets[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return Batch(
        input_ids=ids,
        ctx_len=torch.tensor([len(c) for c in ctx], dtype=torch.long),
        resp_len=torch.tensor([len(r) for r in resp], dtype=torch.long),
        targets=targets,
        persona_keys=[e.persona_key for e in encoded],
        turns=[e.turn for e in encoded],
        has_bos=bool(bos_id is not None and all(c and c[0] == bos_id for c in ctx)),
        tag_len=torch.tensor([e.tag_len for e in encoded], dtype=torch.long),
    )
