"""Triton kernels over the vocabulary axis, installed as `fastrlhf.kernels`.

Each module reads top-down: Triton kernels, host launchers (shape/dtype checks), autograd.Function.
"""
