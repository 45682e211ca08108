"""Functional ops: one file per op, each with its reference, torch.library registration and dispatch."""
from .adapter_bottleneck import (
    adapter_bottleneck,
    adapter_bottleneck_backward,
    adapter_bottleneck_forward,
    adapter_bottleneck_reference,
)
from .ia3_linear import ia3_linear, ia3_linear_reference
from .lora_dora import dora_weight_norm
from .lora_dropout import dropout_mask
from .lora_linear import (
    lora_linear,
    lora_linear_backward,
    lora_linear_forward,
    lora_linear_reference,
)
from .lora_linear_mixed import lora_linear_mixed, lora_linear_mixed_reference

__all__ = [
    "adapter_bottleneck", "adapter_bottleneck_backward", "adapter_bottleneck_forward", "adapter_bottleneck_reference",
    "dora_weight_norm", "dropout_mask", "ia3_linear", "ia3_linear_reference", "lora_linear", "lora_linear_backward",
    "lora_linear_forward", "lora_linear_mixed", "lora_linear_mixed_reference", "lora_linear_reference",
]
