"""spt_fast: fast Selective Prompt Tuning (SPT) for personalised dialogue."""
__version__ = "0.1.0"
