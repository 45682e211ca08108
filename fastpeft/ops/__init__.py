"""Functional ops: one file per op, each with its reference, autograd Function and dispatch."""
from .adapter_bottleneck import AdapterBottleneckFunction, adapter_bottleneck, adapter_bottleneck_reference
from .lora_linear import LoraLinearFunction, dropout_mask, lora_linear, lora_linear_reference

__all__ = ["AdapterBottleneckFunction", "LoraLinearFunction", "adapter_bottleneck", "adapter_bottleneck_reference",
           "dropout_mask", "lora_linear", "lora_linear_reference"]
