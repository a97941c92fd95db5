"""Fused Triton kernels. ``LAUNCHERS`` maps an op name to its launcher; each
launcher takes exactly the arguments of the op's reference in ``mctf_kernels``.
"""
LAUNCHERS: dict = {}
