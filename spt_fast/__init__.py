"""spt_fast: fast Selective Prompt Tuning (SPT) for personalised dialogue."""
import logging

__version__ = "0.1.0"


class _QuietKernelsProbe(logging.Filter):
    """bitsandbytes, on CPUs with AVX512-BF16, tries the optional `kernels` package at import and
    logs a warning that reads like a broken install when it is absent (this project never uses
    it). That one message is dropped; everything else the logger says still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_QuietKernelsProbe())
