"""Functional ops: one file per op, each with its reference, autograd Function and dispatch."""
from .lora_linear import LoraLinearFunction, dropout_mask, lora_linear, lora_linear_reference

__all__ = ["LoraLinearFunction", "dropout_mask", "lora_linear", "lora_linear_reference"]
