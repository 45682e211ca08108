"""torch.distributed on the CPU: a LoRA model (DoRA on some layers) trains under DDP and under FSDP2
(``fully_shard``) with gloo, two processes on loopback, and its gradients and updated weights equal a
single-process run on the whole batch."""
import datetime
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastpeft

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="needs torch.distributed with gloo"), pytest.mark.slow]

WORLD = 2
STEPS = 3
RANK_SECONDS = 300  # for every collective of a rank, and for the two ranks' whole run


class Block(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def build_model():
    torch.manual_seed(0)  # identical on every rank and in the single-process run
    model = nn.Sequential(Block(), Block(), nn.Linear(24, 5))
    fastpeft.apply_lora(model, ["up"], r=4, lora_alpha=8, init_lora_weights=False, backend="torch")
    fastpeft.apply_lora(model, ["down"], r=4, lora_alpha=8, init_lora_weights=False, backend="torch", use_dora=True)
    return fastpeft.apply_adapters(model, ["1"], {"bottleneck": 6}, hidden_size=24, backend="torch")


def build_peft_model(fused):
    """The same blocks with HF PEFT's LoRA on both projections, fused by fastpeft or not."""
    import peft
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(), nn.Linear(24, 5))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    return fastpeft.fuse(model) if fused else model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 24, generator=g), torch.randint(0, 5, (8,), generator=g)


def train(model, x, y):
    """STEPS SGD steps; returns the first step's gradients and the trained parameters, by name."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.5)
    first_grads = None
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if first_grads is None:
            first_grads = {n: _full(p.grad) for n, p in trainable.items()}
        optimizer.step()
    return first_grads, {n: _full(p.detach()) for n, p in trainable.items()}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()  # FSDP2 keeps shards (DTensors)


def _worker(rank, mode, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=RANK_SECONDS))
    try:
        calls = []
        if mode == "fsdp2-fused-peft":  # count the calls that ran fastpeft's op
            from fastpeft import peft_fuse
            real = peft_fuse.lora_linear
            peft_fuse.lora_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
        model = build_peft_model(fused=True) if mode == "fsdp2-fused-peft" else build_model()
        blocks = list(model.base_model.model)[:2] if mode == "fsdp2-fused-peft" else list(model)[:2]
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for block in blocks:  # per block, as accelerate's FSDP2 plugin wraps decoder layers
                fully_shard(block)
            wrapped = fully_shard(model)
            assert all(hasattr(p, "full_tensor") for p in wrapped.parameters())  # every parameter is sharded
        x, y = batch()
        grads, params = train(wrapped, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])
        if mode == "ddp":  # DDP names parameters under "module."
            grads = {n.removeprefix("module."): g for n, g in grads.items()}
            params = {n.removeprefix("module."): p for n, p in params.items()}
        if rank == 0:
            torch.save({"grads": grads, "params": params, "fused_calls": len(calls)}, out_file)
        # Both ranks are done talking before either leaves: a rank leaving while its peer's connection is still in
        # use aborts the peer ("terminate called without an active exception").
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing gloo down: ProcessGroupGloo's destructor can deadlock against its own run-loop threads
    # (seen here: the main thread, holding the GIL, joins a run-loop thread that waits for it), and the result is
    # written. os._exit skips every destructor; the exit code 0 tells the parent this rank succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp2-fused-peft"])
def test_two_processes_match_one(mode, tmp_path, monkeypatch):
    """Two ranks against one process on the whole batch; fsdp2-fused-peft: a PEFT model fused by fastpeft under
    fully_shard per block, against its unfused PEFT twin in one process."""
    if mode.startswith("fsdp2"):
        pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    if mode == "fsdp2-fused-peft":
        pytest.importorskip("peft")
    out_file = tmp_path / "rank0.pt"
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # two ranks, a small machine
    if sys.platform == "linux":  # loopback, whatever the host name resolves to
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    ranks = mp.start_processes(_worker, args=(mode, str(tmp_path / "store"), str(out_file)), nprocs=WORLD,
                               join=False, start_method="spawn")
    deadline = time.monotonic() + RANK_SECONDS
    while not ranks.join(timeout=1):  # raises with a rank's traceback when one fails
        if time.monotonic() > deadline:  # a hang ends the test, never the whole run
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {RANK_SECONDS} s")
    result = torch.load(out_file, weights_only=True)

    model = build_peft_model(fused=False) if mode == "fsdp2-fused-peft" else build_model()
    want_grads, want_params = train(model, *batch())
    assert sorted(result["grads"]) == sorted(want_grads)
    if mode == "fsdp2-fused-peft":
        assert result["fused_calls"] == 4 * STEPS  # every LoRA layer ran fused on every step, sharded around it
    assert len(want_grads) == (8 if mode == "fsdp2-fused-peft" else 14)  # (build_model: two DoRA magnitudes)
    for name, grad in want_grads.items():
        assert torch.allclose(result["grads"][name], grad, rtol=1e-5, atol=1e-6), name
    for name, param in want_params.items():
        assert torch.allclose(result["params"][name], param, rtol=1e-5, atol=1e-6), name
    rebuilt = build_peft_model(fused=False) if mode == "fsdp2-fused-peft" else build_model()
    initial = {n: p for n, p in rebuilt.named_parameters() if p.requires_grad}
    assert all(not torch.equal(want_params[n], initial[n]) for n in initial)  # training moved every parameter
