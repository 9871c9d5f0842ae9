"""rlp-dist kernels (installed as ``rlp_kernels``): each op has a plain-PyTorch reference in
``<op>/reference.py``; :mod:`rlp_kernels.dispatch` picks mamba-ssm / causal-conv1d when the inputs are
on CUDA and the package imports, else the reference (``RLP_KERNELS_FORCE_REFERENCE=1`` forces it)."""
