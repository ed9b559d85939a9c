"""Triton kernels of spt_fast, installed as ``spt_fast.kernels``.

Each op file holds the Triton kernel(s), a launcher, a plain-PyTorch reference with the same
signature and, where gradients are needed, an autograd Function. The public function of each op
dispatches at run time: CUDA tensors go to Triton, everything else to the reference.
"""
if __name__ != "spt_fast.kernels":
    # Imported as top-level `kernels` (repo root on sys.path): refuse, so that bitsandbytes'
    # optional `from kernels import get_kernel` sees an ImportError instead of our folder.
    raise ImportError(
        "spt_fast's kernels/ folder is the package 'spt_fast.kernels', not the top-level 'kernels'"
    )
