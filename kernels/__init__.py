"""Triton kernels of fastpeft, installed as ``fastpeft.kernels`` (one module per op)."""
