"""Evaluation: what the trained prompts are worth.

`evaluate` scores the generation engine's replies on held-out samples with `metrics` (F1, BLEU,
ROUGE, Distinct, optional BERTScore, the paper's columns); `plots` draws prompt usage per turn,
loss curves and metric bars; `study` runs the quality study (PT vs SPT, layouts, loss ablations,
several seeds, resumable) and writes its report.
"""
