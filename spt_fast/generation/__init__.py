"""Generation: replies from a trained SPT model, through one engine.

`engine.Engine` embeds the contexts once, picks a prompt per row (model.prompts.select_prompts),
places it by the layout's rule, prefills once and decodes the whole batch one token per step;
`backends` runs the compact Llama with a static KV cache (or any HF causal LM); `decoding`
chooses tokens on the device; `stops` ends replies at stop strings. `oracle` is the plain
Hugging Face path the tests compare the engine against; nothing that reports a metric uses it.
"""
