"""KV of conversation contexts, kept between requests (shared layouts only).

In a layout that shares the context, the part of a context before the prompt never depends on the
chosen prompt, so its per-layer K/V can be reused by the next request whose context starts with the
same tokens: the next turn of a conversation (the client resends the whole history, as chat
clients do) prefills only what is new. Entries are keyed by their token ids and evicted least
recently used first, within a budget of bytes.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class ContextCache:
    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.used = 0
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest_prefix(self, ids: list[int]) -> tuple[int, tuple[torch.Tensor, torch.Tensor] | None]:
        """(n, (k, v)) for the longest cached entry that is a prefix of `ids` (k, v: [layers, Hkv,
        n, D]), or (0, None). Counts a hit or a miss."""
        best, found = 0, None
        key = tuple(ids)
        for entry in self._entries:
            n = len(entry)
            if best < n <= len(key) and key[:n] == entry:
                best, found = n, entry
        if found is None:
            self.misses += 1
            return 0, None
        self.hits += 1
        self._entries.move_to_end(found)
        return best, self._entries[found]

    def fits(self, n: int, caches) -> bool:
        """Whether n tokens of these per-layer caches' K/V fit the budget at all (else skip the copy)."""
        k = caches[0].k_cache
        per_token = 2 * len(caches) * k.shape[1] * k.shape[3] * k.element_size()
        return n * per_token <= self.budget

    def put(self, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep k, v [layers, Hkv, n, D] (tensors of the caller's own, not views of a live cache) for
        the n tokens `ids`; evicts to stay in budget."""
        key = tuple(ids)
        size = k.numel() * k.element_size() + v.numel() * v.element_size()
        if key in self._entries or size > self.budget:
            return
        while self._entries and self.used + size > self.budget:
            _, (old_k, old_v) = self._entries.popitem(last=False)
            self.used -= old_k.numel() * old_k.element_size() + old_v.numel() * old_v.element_size()
        self._entries[key] = (k, v)
        self.used += size

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
