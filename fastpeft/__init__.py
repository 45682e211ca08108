"""fastpeft: fused kernels for parameter-efficient fine-tuning in PyTorch.

    import fastpeft
    model = fastpeft.apply_lora(model, target_modules=["q_proj", "v_proj"], r=16, lora_alpha=32)

The Triton kernels are imported on first use, so ``import fastpeft`` stays light on CPU-only machines.
"""
from .backends import BackendUnavailableError, available_backends, backend_status
from .layers import AdaptedModule, BottleneckAdapter, Ia3Linear, LoraAdapter, LoraLinear
from .merging import add_weighted_adapter
from .model import (
    ADAPTER_CONFIGS,
    AdapterConfig,
    adapter_layers,
    apply_adapters,
    apply_ia3,
    apply_lora,
    delete_adapter,
    find_targets,
    ia3_layers,
    lora_layers,
    merge_and_unload,
    mixed_batch,
    quantize_nf4,
    remove_adapters,
    set_adapter,
)
from .nf4 import NF4Linear, NF4Weight
from .ops import (
    adapter_bottleneck,
    adapter_bottleneck_reference,
    dora_weight_norm,
    dropout_mask,
    ia3_linear,
    ia3_linear_reference,
    lora_linear,
    lora_linear_mixed,
    lora_linear_mixed_reference,
    lora_linear_reference,
)
from .peft_convert import from_peft, to_peft
from .peft_fuse import fuse, fuse_report, unfuse
from .peft_io import AdapterFileError, load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "AdaptedModule", "ADAPTER_CONFIGS", "AdapterConfig", "AdapterFileError", "BackendUnavailableError",
    "BottleneckAdapter", "Ia3Linear", "LoraAdapter", "LoraLinear", "NF4Linear", "NF4Weight", "adapter_bottleneck",
    "adapter_bottleneck_reference", "adapter_layers", "add_weighted_adapter", "apply_adapters", "apply_ia3",
    "apply_lora", "available_backends", "backend_status", "delete_adapter", "dora_weight_norm", "dropout_mask",
    "find_targets", "from_peft", "fuse", "fuse_report", "ia3_layers", "ia3_linear", "ia3_linear_reference",
    "load_adapter", "lora_layers", "lora_linear", "lora_linear_mixed", "lora_linear_mixed_reference",
    "lora_linear_reference", "merge_and_unload", "mixed_batch", "quantize_nf4", "remove_adapters", "save_adapter",
    "set_adapter", "to_peft", "unfuse",
]
