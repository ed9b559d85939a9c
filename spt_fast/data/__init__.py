"""Data: from corpus files to padded token batches.

`corpora` reads ConvAI2 ParlAI text, JSONL and the packaged chit-chat corpus into `Sample`s (one
per reply, with its persona and history); `text` writes a sample in the paper's format and
tokenises it, dropping the oldest turns to fit `max_len`; `batch` pads encoded samples into a
`Batch`; `pairs` labels persona pairs (sentence BLEU > threshold) for the contrastive loss.
Nothing here knows about models.
"""
