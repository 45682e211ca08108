"""Bad input gets a clear error naming the argument and what was expected; backends explain themselves."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import lora_linear_inputs, refused_by_cli
from torch import nn

import fastpeft
from fastpeft import backends


def inputs(K=12, N=7, r=3, dtype=torch.float32):
    x, w, b, a, bb, _ = lora_linear_inputs(5, K, N, r, dtype, torch.float32, grad=False)
    return dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, scaling=2.0)


def call(**overrides):
    args = inputs()
    args.update(overrides)
    return fastpeft.lora_linear(**args, backend="torch")


@pytest.mark.parametrize("overrides,error,match", [
    (dict(x=torch.randn(5, 11)), ValueError, "x has 11 features"),
    (dict(weight=torch.randn(7)), ValueError, "weight must have shape"),
    (dict(lora_A=torch.randn(3, 11)), ValueError, r"lora_A must have shape \(r, in_features=12\)"),
    (dict(lora_A=torch.randn(0, 12), lora_B=torch.randn(7, 0)), ValueError, "r=0"),
    (dict(lora_B=torch.randn(7, 4)), ValueError, r"lora_B must have shape \(out_features=7, r=3\)"),
    (dict(bias=torch.randn(8)), ValueError, "bias must have shape"),
    (dict(x=torch.randn(5, 12, dtype=torch.float64)), TypeError, "x has dtype torch.float64 but weight"),
    (dict(bias=torch.randn(7, dtype=torch.float16)), TypeError, "bias has dtype"),
    (dict(lora_B=torch.randn(7, 3, dtype=torch.float64)), TypeError, "lora_A has dtype .* lora_B"),
    (dict(x=torch.ones(5, 12, dtype=torch.int64)), TypeError, "x must be a float16"),
    (dict(x=[[1.0] * 12]), TypeError, "x must be a torch.Tensor"),
    (dict(lora_A=torch.randn(3, 12, device="meta")), ValueError, "one device.*lora_A on meta"),
    (dict(scaling=float("nan")), ValueError, "scaling must be a finite"),
    (dict(scaling="2"), ValueError, "scaling must be a finite"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be a number in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(weight=torch.randn(7, 12, requires_grad=True)), ValueError, "weight must be frozen"),
    (dict(weight=torch.randn(7, 12).to_sparse()), TypeError, r"weight must be a dense \(strided\) tensor"),
])
def test_bad_inputs(overrides, error, match):
    with pytest.raises(error, match=match):
        call(**overrides)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(weight=[[1.0] * 12] * 7), TypeError, "weight must be a torch.Tensor, got list"),
    (dict(x=torch.ones(5, 12, dtype=torch.int64)), TypeError, "x must be a float16"),
    (dict(bias=[0.0] * 7), TypeError, "bias must be a torch.Tensor"),
])
def test_autocast_casts_only_what_it_would_and_the_checks_judge_the_rest(overrides, error, match):
    """Under autocast the op casts float tensors only, as torch.autocast does; anything else reaches the checks."""
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(error, match=match):
        call(**overrides)
    wide = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fastpeft.lora_linear(**wide, backend="torch").dtype == torch.float64  # float64 is not autocast's


def test_bottleneck_inputs_are_checked_under_autocast_too():
    h = torch.randn(5, 8)
    wd, wu = torch.randn(3, 8), torch.randn(8, 3)
    with pytest.raises(TypeError, match="w_down must be a torch.Tensor, got NoneType"):
        fastpeft.adapter_bottleneck(h, None, None, wu, None)
    with pytest.raises(TypeError, match="w_up must be a torch.Tensor, got NoneType"):
        fastpeft.adapter_bottleneck(h, wd, None, None, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for residual in (torch.randn(1, 8), torch.randn(5, 1), torch.randn(2, 5, 8)):
            with pytest.raises(ValueError, match=r"residual must have h's shape \(5, 8\)"):
                fastpeft.adapter_bottleneck(h, wd, None, wu, None, residual=residual)
        with pytest.raises(TypeError, match="residual must be a floating-point tensor, got torch.int64"):
            fastpeft.adapter_bottleneck(h, wd, None, wu, None, residual=torch.ones(5, 8, dtype=torch.int64))


def test_dropout_mask_arguments():
    import numpy
    mask = fastpeft.ops.dropout_mask(3, (4, 8), 0.5)
    assert torch.equal(fastpeft.ops.dropout_mask(numpy.int64(3), (4, 8), 0.5), mask)
    for device in ("meta", None, "nowhere", 1.5):
        with pytest.raises(ValueError, match="device must be a CPU or CUDA device"):
            fastpeft.ops.dropout_mask(3, (4, 8), 0.5, device=device)


def test_unknown_backend_names():
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton, cuda; got 'cudnn'"):
        fastpeft.lora_linear(**inputs(), backend="cudnn")
    # modules refuse a bad name when built, not at their first forward
    with pytest.raises(ValueError, match="backend must be one of"):
        fastpeft.LoraLinear(torch.nn.Linear(4, 4), backend="cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastpeft.BottleneckAdapter(8, bottleneck=2, backend="cudnn")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        fastpeft.apply_lora(model, ["0"], backend="cudnn")
    assert type(model[0]) is torch.nn.Linear


def test_bad_environment_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND must be one of"):
        fastpeft.lora_linear(**inputs())
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    assert backends.requested_backend(None) == "torch"
    assert backends.requested_backend("auto") == "auto"  # the argument wins over the environment


def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch):
    """fastpeft and Triton never disagree on TRITON_INTERPRET: a value is read as Triton's own parser reads it, and
    one Triton would silently read as off but that is no off value (" yes ", "2") is refused by name before any
    kernel runs."""
    knobs = pytest.importorskip("triton.knobs")
    for value in ("1", "0", "", "TRUE", "On", "true", "off", "False", "OFF", "yes", "Y", "no", "N"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert backends.triton_interpreting() == bool(knobs.runtime.interpret), value
    for value in (" yes ", "1 ", "2", "enable", "nope"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert not knobs.runtime.interpret  # Triton reads it as off
        message = ("TRITON_INTERPRET must be one of 1, true, on, yes, y, 0, false, off, no, n (in any case, as "
                   f"Triton reads it); got {value!r}")
        with pytest.raises(ValueError) as err:
            backends.triton_interpreting()
        assert str(err.value) == message
    with pytest.raises(ValueError, match="TRITON_INTERPRET must be one of"):
        fastpeft.lora_linear(**inputs(), backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET must be one of"):
        fastpeft.backend_status()


@pytest.mark.parametrize("value", ["disable", "n", "None", "false", " 0", "on", "2"])
def test_auto_measure_takes_1_or_0(monkeypatch, value):
    from fastpeft import auto
    for good, measures in (("1", True), ("0", False), ("", True)):
        monkeypatch.setenv(auto.MEASURE_ENV, good)
        assert auto.measuring_enabled() is measures
    monkeypatch.setenv(auto.MEASURE_ENV, value)
    with pytest.raises(ValueError) as err:
        auto.measuring_enabled()
    assert str(err.value) == f"FASTPEFT_AUTO_MEASURE must be one of 1, 0 (or unset); got {value!r}"


AUTOTUNE_READS = """
import importlib, os
from fastpeft.kernels import common
for value in ("0", "1", "yes"):
    os.environ["FASTPEFT_AUTOTUNE"] = value
    try:
        print(importlib.reload(common).AUTOTUNE)
    except ValueError as err:
        print(err)
"""


def test_autotune_takes_1_or_0():
    """FASTPEFT_AUTOTUNE is read when the kernels are first imported: a bad value is refused there, by name."""
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "-c", AUTOTUNE_READS], capture_output=True, text=True, timeout=300)
    refusal = "FASTPEFT_AUTOTUNE must be one of 1, 0 (or unset); got 'yes'"
    assert out.stdout.splitlines() == ["False", "True", refusal], out.stderr


@pytest.mark.parametrize("variable,value,message", [
    ("FASTPEFT_BACKEND", "fastest", "FASTPEFT_BACKEND must be one of auto, torch, triton, cuda; got 'fastest'"),
    ("TRITON_INTERPRET", " yes ", "TRITON_INTERPRET must be one of 1, true, on, yes, y, 0, false, off, no, n (in "
                                  "any case, as Triton reads it); got ' yes '"),
    ("FASTPEFT_AUTO_MEASURE", "disable", "FASTPEFT_AUTO_MEASURE must be one of 1, 0 (or unset); got 'disable'"),
    ("FASTPEFT_AUTOTUNE", "off", "FASTPEFT_AUTOTUNE must be one of 1, 0 (or unset); got 'off'"),
    ("FASTPEFT_GEMM_VARIANT", "sideways", "FASTPEFT_GEMM_VARIANT must be one of prologue, epilogue, cublas, tma, "
                                          "got 'sideways'"),
])
def test_info_names_a_bad_environment_value(capsys, monkeypatch, variable, value, message):
    """``python -m fastpeft info`` checks every variable fastpeft reads: a bad value is one line naming it."""
    monkeypatch.setenv(variable, value)
    assert refused_by_cli(capsys, "info") == f"error: {message}\n"


def test_info_names_a_bad_environment_value_as_a_command():
    out = subprocess.run([sys.executable, "-m", "fastpeft", "info"], env={**os.environ, "FASTPEFT_AUTOTUNE": "off"},
                         capture_output=True, text=True, timeout=300)
    assert (out.returncode, out.stdout, out.stderr) == (
        2, "", "error: FASTPEFT_AUTOTUNE must be one of 1, 0 (or unset); got 'off'\n")


def test_explicit_backend_lists_every_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = inputs(dtype=torch.float64)
    args["lora_A"], args["lora_B"] = args["lora_A"].double(), args["lora_B"].double()
    with pytest.raises(fastpeft.BackendUnavailableError) as err:
        fastpeft.lora_linear(**args, backend="triton")
    message = str(err.value)
    assert "float64" in message and "TRITON_INTERPRET" in message
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in message


@pytest.mark.parametrize("triton_version,numpy_version,runs", [
    ("3.6.0", "2.3.0", False), ("3.6.0", "2.2.6", True), ("3.7.1", "2.4.6", True), ("3.9.0+git1a2b", "2.3.0", True)])
def test_an_interpreter_that_cannot_run_here_is_a_reason(monkeypatch, triton_version, numpy_version, runs):
    """Triton 3.6's interpreter breaks on NumPy >= 2.3: under TRITON_INTERPRET=1 that is a reason against Triton
    (explicit requests name it, tests skip with it), never a crash inside a kernel."""
    triton = pytest.importorskip("triton")
    numpy = pytest.importorskip("numpy")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    backends._interpreter_broken.cache_clear()
    try:
        reasons = backends.backend_status()["triton"]
        if runs:
            assert reasons == []
            return
        assert reasons == [f"Triton {triton_version}'s CPU interpreter (TRITON_INTERPRET=1) does not run with NumPy "
                           f"{numpy_version}: it needs Triton >= 3.7 or NumPy < 2.3"]
        with pytest.raises(fastpeft.BackendUnavailableError, match="does not run with NumPy"):
            fastpeft.lora_linear(**inputs(), backend="triton")
    finally:
        backends._interpreter_broken.cache_clear()


def test_auto_falls_back_to_torch_for_what_triton_cannot_run():
    args = inputs(dtype=torch.float64)
    args["lora_A"], args["lora_B"] = args["lora_A"].double(), args["lora_B"].double()
    assert backends.select_backend("auto", [args["x"]]) == "torch"
    y = fastpeft.lora_linear(**args, backend="auto")
    assert y.dtype == torch.float64


def test_layer_arguments():
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        fastpeft.LoraLinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="r must be a positive integer"):
        fastpeft.LoraLinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        fastpeft.LoraLinear(nn.Linear(4, 4), lora_dropout=1.5)
    with pytest.raises(ValueError, match="lora_alpha must be a finite number"):  # too large for a float
        fastpeft.LoraLinear(nn.Linear(4, 4), lora_alpha=10**400)
    with pytest.raises(ValueError, match="init_lora_weights"):
        fastpeft.LoraLinear(nn.Linear(4, 4), init_lora_weights="pissa")
    with pytest.raises(ValueError, match="adapter_name"):
        fastpeft.LoraLinear(nn.Linear(4, 4), adapter_name="a.b")


def test_available_backends_and_info_command():
    status = fastpeft.backend_status()
    assert set(status) == {"torch", "triton", "cuda"} and status["torch"] == []
    assert "torch" in fastpeft.available_backends()
    out = subprocess.run([sys.executable, "-m", "fastpeft", "info"], capture_output=True, text=True, check=True)
    assert "torch   available" in out.stdout
    assert "triton " in out.stdout


def test_each_backends_reasons_come_once_per_call_and_once_each(monkeypatch):
    """The op's backend table decides: the cuda entry's reasons are computed once for a call, and a reason shared
    by several tensors is listed once."""
    from fastpeft import cuda_ext
    calls = []
    real = cuda_ext.decode_reasons
    monkeypatch.setattr(cuda_ext, "decode_reasons", lambda *a: calls.append(1) or real(*a))
    args = inputs(dtype=torch.float64)
    args["lora_A"], args["lora_B"] = args["lora_A"].double(), args["lora_B"].double()
    args["x"].requires_grad_(True)
    with pytest.raises(fastpeft.BackendUnavailableError) as err:
        fastpeft.lora_linear(**args, dropout_p=0.1, backend="cuda")
    assert len(calls) == 1
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == len(set(lines)) and any("float64" in line for line in lines)
    assert any("no dropout" in line for line in lines) and any("forward-only" in line for line in lines)
    fastpeft.lora_linear(**args, backend="auto")  # on CPU tensors auto never asks the cuda entry
    assert len(calls) == 1


@pytest.mark.parametrize("body,error,match", [
    (None, ImportError, "needs the peft package"),  # absent: say what to install
    ("from transformers_missing_dependency import X\n", ModuleNotFoundError, "transformers_missing_dependency"),
    ("raise ImportError(\"cannot import name 'CUDAProperties' from 'kernels'\")\n", ImportError, "CUDAProperties"),
], ids=["absent", "dependency-missing", "broken"])
def test_converting_says_why_peft_does_not_import(monkeypatch, tmp_path, body, error, match):
    """"Install peft" only when peft itself is absent; a peft that is installed but fails to import raises its own
    error, which says what to fix."""
    if body is None:
        monkeypatch.setitem(sys.modules, "peft", None)  # how Python marks a module as not importable
    else:
        (tmp_path / "peft").mkdir()
        (tmp_path / "peft" / "__init__.py").write_text(body)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "peft", raising=False)
    model = nn.Sequential(fastpeft.LoraLinear(nn.Linear(4, 4), r=2))
    with pytest.raises(error, match=match):
        fastpeft.to_peft(model)
    with pytest.raises(error, match=match):
        fastpeft.from_peft(model)
