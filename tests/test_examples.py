"""The examples run (shortened) and do what they say."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_finetune_tiny_llama_shortened(tmp_path):
    example = load("finetune_tiny_llama")
    result = example.main(["--steps", "40", "--quiet", "--out", str(tmp_path / "adapter")])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert result["steps"] <= 40 and result["last_loss"] < 0.8 * result["first_loss"]
    # HF PEFT's reload gives the fine-tuned logits, which differ clearly from the base model's.
    assert result["logits_close"] and result["max_logit_diff"] < 1e-5
    assert result["adapter_effect"] > 0.1
