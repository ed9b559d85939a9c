"""Training: the trainer, its checkpoints and the PEFT export.

`trainer` runs AdamW on the soft prompts and the retriever only (the base stays frozen), with a
seeded, resumable data order, periodic validation and checkpoints; `checkpoint` writes and reads
checkpoints atomically (safetensors + JSON) and rebuilds a trained model for inference; `export`
writes one soft prompt as a PEFT prompt-tuning adapter.
"""
