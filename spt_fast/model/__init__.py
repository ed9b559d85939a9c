"""Model: the frozen LM and what SPT trains on top of it.

`loading` reads the base model and tokenizer (the embedded default, a local folder or GGUF, or a
random-weight preset shape); `llama` is the compact Llama forward (context pass, branch pass,
static-cache prefill/decode); `quant` puts the base in NF4 and keeps soft-prompt gradients exact;
`cpu_projections` are the CPU engine's packed dense layers. `layouts` is the one rule for where
the soft prompt sits in a sequence; `prompts` holds the K soft prompts and the retriever;
`spt` the batched K·B forward and `losses` the four losses; `shared` runs the shared-context
layouts with the context once; `build` picks the implementation for a base model and layout.
"""
