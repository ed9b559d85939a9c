import os

# Set before anything imports transformers or triton: no hub access, and Triton kernels run in
# the CPU interpreter when there is no GPU.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Engines loaded by from_checkpoint (the CLI's) step eagerly in tests unless a test asks for a
# compile mode: a background compile per test would cost CI minutes. tests/test_serve.py
# covers the default ("auto").
os.environ.setdefault("SPT_FAST_COMPILE", "off")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from spt_fast import testing  # noqa: E402


@pytest.fixture(scope="session")
def char_tok():
    return testing.char_tokenizer()


@pytest.fixture
def tiny_llama():
    return testing.tiny_llama()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama + char tokenizer saved as a local HF folder (read-only for tests)."""
    d = tmp_path_factory.mktemp("tiny_llama_dir")
    testing.tiny_llama().save_pretrained(d)
    testing.char_tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture
def tiny_opt():
    return testing.tiny_opt()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
