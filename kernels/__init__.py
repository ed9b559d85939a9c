"""spt_fast.kernels: the Triton kernels, each file beside its PyTorch reference (DESIGN §3).

retrieval (fused retriever scores), inject (prompt injection), branch_attention (K·B branches
over a shared context KV), fused_ce (LM head + cross-entropy on response positions), nf4 (4-bit
weights read in place); runtime holds what they share (Triton or reference, device guard, dot
modes). Each op's public function sends CUDA tensors to Triton and everything else to the
reference.

This folder sits at the top of the repository and installs as `spt_fast.kernels` only.
"""
import importlib.machinery
import importlib.util
import os
import sys
import types


def _stand_aside(name: str) -> None:
    """Found as a top-level `kernels` (Python started in the repository root): that name belongs
    to an unrelated package (transformers >= 5.25 depends on it and imports from it; bitsandbytes
    probes it). Put the real one in our place when it is installed elsewhere on sys.path, else an
    empty module, which to both libraries looks not installed (no file, no attributes)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is not None and spec.loader is not None:
        real = importlib.util.module_from_spec(spec)
        sys.modules[name] = real  # the import system returns whatever sits here when we finish
        spec.loader.exec_module(real)
        return
    empty = types.ModuleType(name)
    empty.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    empty.__path__ = []
    sys.modules[name] = empty


if __name__ != "spt_fast.kernels":
    _stand_aside(__name__)
