"""Fine-tune a tiny Llama with fastpeft LoRA, then hand the adapter to Hugging Face PEFT.

    python examples/finetune_tiny_llama.py            # CPU, about a minute
    python examples/finetune_tiny_llama.py --device cuda --steps 400

The model is built from a transformers config (random weights, nothing downloaded). LoRA goes on the attention
projections (q/k/v/o) and the MLP (gate/up/down); everything else stays frozen. The synthetic task: continue
arithmetic progressions modulo the vocabulary (3, 10, 17, 24, ...), whose step the model has to read from the
context, so both attention and MLP adapters have work to do. Training stops once the loss is below a quarter of
where it started. The adapter is then saved in PEFT's format, loaded into a fresh copy of the base model by
``peft.PeftModel.from_pretrained``, and both models' logits are compared.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

import fastpeft

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64


def build_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    # A random base stands in for a pretrained one. transformers' default init (std 0.02) leaves the frozen output
    # head a logit range of about ±1, too narrow for any confident prediction; a wider init gives it a trained
    # model's range, so what LoRA learns shows in the loss.
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.15)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def progressions(batch_size: int, length: int, generator: torch.Generator, device) -> torch.Tensor:
    """Rows ``start, start+step, start+2·step, ...`` modulo VOCAB, with a random start and step per row."""
    start = torch.randint(0, VOCAB, (batch_size, 1), generator=generator)
    step = torch.randint(1, 8, (batch_size, 1), generator=generator)
    return ((start + step * torch.arange(length)) % VOCAB).to(device)


def loss_on(model, ids: torch.Tensor) -> torch.Tensor:
    # The first two tokens cannot be predicted (the step is unknown until then), so they are not scored.
    labels = ids.clone()
    labels[:, :2] = -100
    return model(input_ids=ids, labels=labels).loss


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="most optimizer steps (stops early once learned)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=24, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="adapter folder (default: a temporary one)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    device = torch.device(args.device)
    base = build_model(args.seed)
    model = fastpeft.apply_lora(copy.deepcopy(base), TARGETS, r=args.rank, lora_alpha=2 * args.rank,
                                lora_dropout=0.05).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    print(f"LoRA r={args.rank} on {len(fastpeft.lora_layers(model))} layers: "
          f"{sum(p.numel() for p in trainable):,} trainable of {total:,} parameters")

    data = torch.Generator().manual_seed(args.seed + 1)
    held_out = progressions(256, args.length, torch.Generator().manual_seed(args.seed + 2), device)
    model.eval()
    with torch.no_grad():
        first_loss = loss_on(model, held_out).item()
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    model.train()
    started = time.perf_counter()
    smoothed, steps = first_loss, 0
    bar = tqdm(range(args.steps), desc="fine-tuning", disable=args.quiet, file=sys.stdout)
    for _ in bar:
        steps += 1
        loss = loss_on(model, progressions(args.batch_size, args.length, data, device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        smoothed = 0.9 * smoothed + 0.1 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.3f}")
        if smoothed < first_loss / 4:
            break
    bar.close()
    model.eval()
    with torch.no_grad():
        last_loss = loss_on(model, held_out).item()
    print(f"held-out loss {first_loss:.3f} -> {last_loss:.3f} after {steps} steps "
          f"({time.perf_counter() - started:.1f} s on {device})")

    import peft
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp) / "adapter"
        fastpeft.save_adapter(model, folder)
        reloaded = peft.PeftModel.from_pretrained(base, str(folder)).to(device).eval()
        with torch.no_grad():
            ours = model(input_ids=held_out[:8]).logits
            theirs = reloaded(input_ids=held_out[:8]).logits
            with reloaded.disable_adapter():
                untuned = reloaded(input_ids=held_out[:8]).logits
    diff = (ours - theirs).abs().max().item()
    print(f"saved the adapter{f' to {folder}' if args.out else ''}; HF PEFT reloaded it: max |logits difference| = "
          f"{diff:.2e} over {ours.numel():,} logits")
    return {"first_loss": first_loss, "last_loss": last_loss, "steps": steps, "max_logit_diff": diff,
            "logits_close": torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5),
            "adapter_effect": (ours - untuned).abs().max().item()}


if __name__ == "__main__":
    result = main()
    learned = result["last_loss"] < result["first_loss"] / 2
    if not learned:
        print("the loss did not fall by half: try more --steps")
    sys.exit(0 if learned and result["logits_close"] else 1)
