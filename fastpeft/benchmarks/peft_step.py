"""A whole training step of a PeftModel, fused (``fastpeft.fuse``) against the same PeftModel unfused: what a user of
HF PEFT sees. A transformers Llama built from a config (no download), LoRA r=16 on all seven projections, dropout
0.05; forward, loss and backward of one batch, the two models timed in interleaved rounds in one process."""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

import torch

from .measure import _ticker, interleaved_times

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class StepShape:
    hidden: int
    layers: int
    seq: int
    batch: int

    def __str__(self) -> str:
        return f"hidden {self.hidden}, {self.layers} layers, seq {self.seq}, batch {self.batch}"


CPU_STEP = StepShape(512, 4, 256, 4)
QUICK_STEP = StepShape(256, 2, 128, 2)
GPU_STEP = StepShape(2048, 16, 1024, 4)  # a 1B-shaped step


@dataclass
class StepResult:
    shape: StepShape
    candidate: str
    ms: float
    runs: list


def _models(shape: StepShape, dtype, device):
    import peft
    import transformers

    from ..peft_fuse import fuse
    config = transformers.LlamaConfig(hidden_size=shape.hidden, intermediate_size=int(shape.hidden * 2.6875),
                                      num_hidden_layers=shape.layers, num_attention_heads=max(1, shape.hidden // 64),
                                      vocab_size=1024, max_position_embeddings=max(512, shape.seq))
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=PROJECTIONS)
    unfused = peft.get_peft_model(base, lora).train()
    fused = fuse(copy.deepcopy(unfused))
    return {"peft": unfused, "peft + fastpeft.fuse": fused}


def run_peft_step(shape: StepShape = CPU_STEP, dtype=torch.float32, device="cpu", rounds: int = 10,
                  progress=None) -> list[StepResult]:
    """The median time of one training step of each model, over ``rounds`` interleaved rounds."""
    tick = _ticker(progress, 1)
    models = _models(shape, dtype, device)
    ids = torch.randint(0, 1024, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(1)).to(device)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
        return run
    times = interleaved_times({name: step(model) for name, model in models.items()}, device, rounds)
    tick()
    return [StepResult(shape, name, statistics.median(ms), ms) for name, ms in times.items()]


def format_step_table(results: list[StepResult]) -> str:
    reference = {r.shape: r.ms for r in results if r.candidate == "peft"}
    lines = ["| model | candidate | median ms | time / peft |", "|---|---|---|---|"]
    for r in results:
        ratio = f"{r.ms / reference[r.shape]:.2f}" if reference.get(r.shape) else "-"
        lines.append(f"| Llama, {r.shape} | {r.candidate} | {r.ms:.1f} | {ratio} |")
    return "\n".join(lines) + (
        "\n\nLower is better. One training step (forward, causal-LM loss, backward) of a transformers Llama built "
        "from a config, HF PEFT's LoRA r=16 on all seven projections with dropout 0.05, against the same "
        "PeftModel after fastpeft.fuse; median ms: median over rounds that interleave the two models; "
        "time / peft: relative to the unfused PeftModel.")
