"""Persona-pair labels of the context-prompt contrastive loss (DESIGN §1, loss 4).

y_ij = +1 when the sentence BLEU (sacrebleu) of persona i against persona j is above a threshold
(20 in the paper), else -1. Personas repeat across a corpus, so each pair is scored once.
"""
import sacrebleu
import torch


def sentence_bleu(hyp: str, ref: str) -> float:
    """sacrebleu sentence BLEU (0..100) of one hypothesis against one reference."""
    return float(sacrebleu.sentence_bleu(hyp, [ref]).score)


class PersonaPairs:
    """Pair labels for lists of persona keys (" ".join(persona)), cached per ordered pair."""

    def __init__(self, threshold: float = 20.0):
        self.threshold = threshold
        self._cache: dict = {}

    def label(self, a: str, b: str) -> float:
        key = (a, b)
        if key not in self._cache:
            bleu = sentence_bleu(a, b) if a and b else 0.0
            self._cache[key] = 1.0 if bleu > self.threshold else -1.0
        return self._cache[key]

    def labels(self, persona_keys: list) -> torch.Tensor:
        """[B, B] of ±1; only the upper triangle (i < j) is meaningful."""
        B = len(persona_keys)
        y = -torch.ones(B, B)
        for i in range(B):
            for j in range(i + 1, B):
                y[i, j] = self.label(persona_keys[i], persona_keys[j])
        return y
