"""Fused output projection + tempered log-softmax + target gather (and entropy), chunked over tokens and
vocab-parallel over TP: ``reference.py`` (PyTorch, any device; the math and memory are in its docstring),
``triton.py`` (CUDA: Triton kernels for each chunk's softmax statistics and logits gradient, cuBLAS
matmuls). Call it through :func:`rlp_kernels.dispatch.linear_logprob`, which picks between them."""
