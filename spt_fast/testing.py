"""Tiny offline stand-ins (tokenizer, random-weight models) for tests and benchmarks.

Nothing here touches a model hub: the tokenizer is a character-level vocabulary built in memory
and the models are random-initialised from small configs.
"""
import string

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII, with pad/bos/eos/unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(vocab_size=104, hidden=64, layers=2, heads=4, kv_heads=2, seed=0, dtype=torch.float32,
               init_std=0.02):
    """A random-weight LlamaForCausalLM small enough for CPU tests (GQA on, untied head).

    A larger `init_std` gives a model whose outputs soft prompts can actually steer (at 0.02 the
    logits of a tiny random model are nearly uniform whatever the input).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=init_std,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def tiny_opt(vocab_size=104, hidden=64, layers=2, heads=4, seed=0, dtype=torch.float32):
    """A random-weight OPTForCausalLM (learned positions, tied head) for the generic path."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=vocab_size, hidden_size=hidden, ffn_dim=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=1024, word_embed_proj_dim=hidden,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, dropout=0.0, attention_dropout=0.0,
    )
    model = OPTForCausalLM(cfg).to(dtype)
    return model.eval()
