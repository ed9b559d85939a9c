"""spt_fast.kernels: the Triton kernels, each file beside its PyTorch reference (DESIGN §3).

retrieval (fused retriever scores), inject (prompt injection), branch_attention (K·B branches
over a shared context KV), fused_ce (LM head + cross-entropy on response positions), nf4 (4-bit
weights read in place); runtime holds what they share (Triton or reference, device guard, dot
modes). Each op's public function sends CUDA tensors to Triton and everything else to the
reference.

This folder sits at the top of the repository and installs as `spt_fast.kernels` only.
"""
import importlib.machinery
import sys
import types

if __name__ != "spt_fast.kernels":
    # Found as a top-level `kernels` (Python started in the repository root). That name belongs to
    # an unrelated package which transformers and bitsandbytes probe for; to them this must look
    # not installed, as an empty namespace does (no file, no version, no attributes), so the
    # module is replaced by an empty one before anything of ours is loaded under that name.
    _empty = types.ModuleType(__name__)
    _empty.__spec__ = importlib.machinery.ModuleSpec(__name__, None, is_package=True)
    _empty.__path__ = []
    sys.modules[__name__] = _empty
