"""fastpeft._C: built wherever nvcc is (CI builds it on CPU), importable without a GPU, and a kernel call there
raises a clear error instead of crashing. GPU tests of the decode kernel are in test_gpu.py."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastpeft
from fastpeft import cuda_ext

NVCC = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
DRIVER = os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))
# What setup.py builds: FASTPEFT_CUDA=1 always (CI sets it where nvcc is); auto only with nvcc and a driver.
MODE = os.environ.get("FASTPEFT_CUDA", "auto")
EXPECT_BUILT = MODE == "1" or (MODE == "auto" and NVCC and DRIVER)


@pytest.mark.skipif(not EXPECT_BUILT, reason="not built here: FASTPEFT_CUDA=0, or auto without nvcc and a driver")
def test_extension_was_built_and_imports():
    module, reason = cuda_ext.load()
    assert module is not None, reason
    assert "80" in module.cuda_archs and "90a" in module.cuda_archs
    assert module.max_decode_rows == cuda_ext.MAX_DECODE_ROWS and module.max_decode_rank == cuda_ext.MAX_DECODE_RANK


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_kernel_call_without_gpu_raises_clear_error():
    module, reason = cuda_ext.load()
    if module is None:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="no CUDA GPU or driver usable .cudaGetDeviceCount: cuda"):
        module.device_count()
    with pytest.raises(RuntimeError, match="no CUDA GPU or driver"):
        module.lora_linear_decode(x=0, w=0, bias=0, a=0, b=0, s=0, counters=0, y=0, M=1, K=8, N=8, R=4, stride_xm=8,
                           stride_ym=8, scaling=1.0, dtype=1, adapter_dtype=2, vector=True, device=0, stream=0)
    with pytest.raises(ValueError, match="M must be in"):
        module.lora_linear_decode(x=0, w=0, bias=0, a=0, b=0, s=0, counters=0, y=0, M=17, K=8, N=8, R=4, stride_xm=8,
                           stride_ym=8, scaling=1.0, dtype=1, adapter_dtype=2, vector=True, device=0, stream=0)
    assert "no CUDA GPU or driver" in cuda_ext.status()


def test_python_side_validates_before_any_pointer_crosses():
    x, w = torch.randn(20, 8), torch.randn(6, 8)
    a, b = torch.randn(300, 8), torch.randn(6, 300)
    module, _ = cuda_ext.load()
    if module is None:
        with pytest.raises(RuntimeError, match="not built"):
            cuda_ext.lora_linear_decode(x, w, None, a, b, 1.0)
        return
    with pytest.raises(ValueError) as err:
        cuda_ext.lora_linear_decode(x, w.t().contiguous().t(), None, a, b, 1.0)
    message = str(err.value)
    for expected in ("CUDA tensors", "M <= 16", "r <= 256", "weight must be contiguous"):
        assert expected in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_backend_explains_why_not():
    x, w = torch.randn(2, 8), torch.randn(6, 8)
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(6, 4)
    with pytest.raises(fastpeft.BackendUnavailableError) as err:
        fastpeft.lora_linear(x, w, None, a, b, 1.0, dropout_p=0.1, backend="cuda")
    message = str(err.value)
    for expected in ("no CUDA GPU", "CUDA tensors", "forward-only", "no dropout"):
        assert expected in message
    assert "cuda" not in fastpeft.available_backends()


def test_info_reports_the_extension():
    out = subprocess.run([sys.executable, "-m", "fastpeft", "info"], capture_output=True, text=True, check=True)
    assert "extension fastpeft._C:" in out.stdout
    assert "cuda " in out.stdout


def test_adapter_bottleneck_decode_validates_and_explains():
    h, wd, wu = torch.randn(20, 8), torch.randn(300, 8), torch.randn(8, 300).t().contiguous().t()
    module, _ = cuda_ext.load()
    if module is None:
        with pytest.raises(RuntimeError, match="not built"):
            cuda_ext.adapter_bottleneck_decode(h, wd, None, wu, None, None, 1.0, "relu")
        return
    with pytest.raises(ValueError) as err:
        cuda_ext.adapter_bottleneck_decode(h, wd, None, wu, None, None, 1.0, "tanh")
    message = str(err.value)
    for expected in ("CUDA tensors", "M <= 16", "m <= 256", "w_up must be contiguous", "activation must be"):
        assert expected in message
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU or driver"):
            module.adapter_bottleneck_decode(h=0, w_down=0, b_down=0, w_up=0, b_up=0, res=0, act=0, counters=0,
                                             out=0, M=1, d=8, m=4, stride_hm=8, stride_rm=8, stride_om=8,
                                             scaling=1.0, activation=0, dtype=1, vector=True, device=0, stream=0)
