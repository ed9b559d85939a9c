"""Which implementation of SPT runs a given base model and layout."""
from .spt import SPTConfig, SPTModel


def build_spt_model(base, config: SPTConfig, tokenizer=None) -> SPTModel:
    return SPTModel(base, config, tokenizer)
