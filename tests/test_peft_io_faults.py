"""Adapter folders under faults, for real: writers killed with SIGKILL at random instants, and two processes saving to
one folder while a third reads. Every read must see one whole adapter, never one's config with another's weights."""
import json
import os
import random
import signal
import time

import pytest
import torch
from conftest import fork
from torch import nn

import fastpeft

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"), pytest.mark.slow]

LAYERS = 300  # enough that a save takes a while, so kills land in every phase of it
TAGS = (3, 5)  # adapter "3": lora_alpha 3 and every weight 3.0; adapter "5" likewise


def tagged_model(tag, layers=LAYERS):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)])
    fastpeft.apply_lora(model, r"\d+", r=2, lora_alpha=tag)
    with torch.no_grad():
        for layer in fastpeft.lora_layers(model).values():
            layer.lora_A.fill_(tag)
            layer.lora_B.fill_(tag)
    return model


def whole_adapter(folder, layers=LAYERS) -> int:
    """The tag of the adapter ``load_adapter`` reads from ``folder``; fails on any mix of two adapters."""
    model = fastpeft.load_adapter(nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)]), folder)
    layers = fastpeft.lora_layers(model).values()
    tags = {layer.lora_alpha for layer in layers}
    tags |= {float(t) for layer in layers for weight in (layer.lora_A, layer.lora_B) for t in weight.detach().unique()}
    assert len(tags) == 1, f"a mix of adapters: {tags}"
    return int(tags.pop())


def leftovers(tmp_path, folder):
    return sorted(set(os.listdir(tmp_path)) - {folder.name})


def test_writers_killed_at_random_instants_leave_one_whole_adapter(tmp_path):
    models = {tag: tagged_model(tag) for tag in TAGS}
    folder = tmp_path / "adapter"
    fastpeft.save_adapter(models[3], folder)
    rng = random.Random(0)
    seen = set()
    deadline = time.monotonic() + 40

    def save_forever():
        while True:
            for tag in (5, 3):
                fastpeft.save_adapter(models[tag], folder)

    kills = 0
    while kills < 30 and time.monotonic() < deadline:
        pid = fork(save_forever)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        seen.add(whole_adapter(folder))
        assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert kills >= 10 and seen == set(TAGS)
    # Whatever the kills left beside the folder, a later save clears it and wins whole.
    fastpeft.save_adapter(models[5], folder)
    assert leftovers(tmp_path, folder) == [] and whole_adapter(folder) == 5


def test_two_writers_and_a_reader(tmp_path):
    """Two processes save different adapters into one folder while this one reads it: until it has made 30 reads
    and seen both adapters (at least 3 s, at most 60 s, so a loaded machine only makes it longer), every read is
    one whole adapter."""
    models = {tag: tagged_model(tag) for tag in TAGS}
    folder = tmp_path / "adapter"
    fastpeft.save_adapter(models[3], folder)
    done = tmp_path / "done"

    def save_until_done(tag):
        def work():
            while not done.exists():
                fastpeft.save_adapter(models[tag], folder)
        return work

    writers = [fork(save_until_done(tag)) for tag in TAGS]
    reads, seen = 0, set()
    start = time.monotonic()
    try:
        while time.monotonic() - start < 60 and (reads < 30 or seen != set(TAGS) or time.monotonic() - start < 3):
            seen.add(whole_adapter(folder))
            reads += 1
            # Every file, read on its own, is always whole too.
            json.loads((folder / "adapter_config.json").read_text())
    finally:
        done.touch()
        for pid in writers:
            os.waitpid(pid, 0)
        done.unlink()
    assert reads >= 30 and seen == set(TAGS)
    assert leftovers(tmp_path, folder) == [] and whole_adapter(folder) in TAGS
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_peft_reads_a_folder_saved_over_and_over(tmp_path):
    peft = pytest.importorskip("peft")
    models = {tag: tagged_model(tag) for tag in TAGS}
    folder = tmp_path / "adapter"
    for tag in (3, 5, 3, 5):
        fastpeft.save_adapter(models[tag], folder)
    theirs = peft.PeftModel.from_pretrained(nn.Sequential(*[nn.Linear(4, 4) for _ in range(LAYERS)]), str(folder))
    layer = theirs.base_model.model[0]
    assert layer.scaling["default"] == 5 / 2 and torch.all(layer.lora_A["default"].weight == 5)


def test_saves_to_a_folder_and_its_subfolder_at_once(tmp_path):
    """PEFT's layout keeps the default adapter in the folder and others in subfolders; saving both at once loses
    neither: a save to the folder carries the subfolder over while holding off saves into it."""
    models = {tag: tagged_model(tag, layers=2) for tag in TAGS}  # small: many saves, many chances to collide
    root, sub = tmp_path / "out", tmp_path / "out" / "sub"
    fastpeft.save_adapter(models[3], root)
    fastpeft.save_adapter(models[5], sub)
    stop = time.monotonic() + 4

    def saves(folder, last):
        def work():
            while time.monotonic() < stop:
                for tag in TAGS:
                    fastpeft.save_adapter(models[tag], folder)
            fastpeft.save_adapter(models[last], folder)  # the last save of each writer must stay
        return work

    writers = [fork(saves(root, 5)), fork(saves(sub, 3))]
    statuses = [os.waitpid(pid, 0)[1] for pid in writers]
    assert statuses == [0, 0]
    assert whole_adapter(root, layers=2) == 5 and whole_adapter(sub, layers=2) == 3
    assert sorted(os.listdir(root)) == ["adapter_config.json", "adapter_model.safetensors", "sub"]
    assert sorted(os.listdir(sub)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert leftovers(tmp_path, root) == []
