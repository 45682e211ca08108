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
    args = dict(x=0, w=0, bias=0, a=0, b=0, s=0, counters=0, y=0, M=1, K=8, N=8, R=4, stride_xm=8, stride_ym=8,
                k_split=1, k_chunk=8, scaling=1.0, dtype=1, adapter_dtype=2, vector=True, device=0, stream=0)
    with pytest.raises(RuntimeError, match="no CUDA GPU or driver"):
        module.lora_linear_decode(**args)
    with pytest.raises(ValueError, match="M must be in"):
        module.lora_linear_decode(**{**args, "M": 17})
    with pytest.raises(ValueError, match="must cover K exactly"):
        module.lora_linear_decode(**{**args, "k_split": 2})
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


def _cuobjdump():
    import triton  # its wheel ships a cuobjdump that reads every arch the extension is built for
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for candidate in (bundled, shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.mark.slow
def test_decode_kernels_load_16_bytes_and_never_spill():
    """The SASS of every decode kernel, sm_80 and sm_90a: the vector instances (VECTOR=true) stream W (an NF4 base's
    packed codes too) with 16-byte loads (LDG.E.128), and no instance uses local memory (a spill)."""
    import re
    module, reason = cuda_ext.load()
    if module is None:
        pytest.skip(reason)
    pytest.importorskip("triton")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump here")
    sass = subprocess.run([tool, "-sass", module.__file__], capture_output=True, text=True, check=True).stdout
    kernels = []
    for arch, code in re.findall(r"code for (sm_\w+)(.*?)(?=code for sm_|\Z)", sass, flags=re.S):
        for name, body in re.findall(r"Function : (\S+)(.*?)(?=Function : |\Z)", code, flags=re.S):
            vector_flag = re.search(r"Li\d+ELb([01])E", name)  # VECTOR, the bool after MAXM
            kernels.append((arch, name, bool(vector_flag) and vector_flag.group(1) == "1", "LDG.E.128" in body))
    assert {arch for arch, *_ in kernels} >= {"sm_80", "sm_90a"}
    vector = [k for k in kernels if k[2]]
    assert len(vector) >= 2 * 2 * 5 * 2 and all(k[3] for k in vector), [k[:2] for k in vector if not k[3]]
    usage = subprocess.run([tool, "-res-usage", module.__file__], capture_output=True, text=True, check=True).stdout
    local = re.findall(r"LOCAL:(\d+)", usage)
    assert len(local) == len(kernels) and set(local) == {"0"}


def test_decode_counters_are_never_shared_by_launches_that_may_overlap(monkeypatch):
    """Counters per stream for eager launches; while a CUDA graph captures, a slot of its own for each captured
    launch, from a pool made by an earlier eager call (never from the graph's memory); a clear error otherwise.
    (The device is the CPU here: only the bookkeeping is tested; test_gpu.py replays real graphs.)"""
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(cuda_ext, "_stream_counters", {})
    monkeypatch.setattr(cuda_ext, "_graph_pools", {})
    monkeypatch.setattr(cuda_ext, "GRAPH_SLOTS", 3)
    cpu = torch.device("cpu")
    capturing[0] = True
    with pytest.raises(RuntimeError, match="run the model once outside capture first"):
        cuda_ext._counters(cpu, 7)
    capturing[0] = False
    stream7 = cuda_ext._counters(cpu, 7)
    assert cuda_ext._counters(cpu, 7) is stream7 and cuda_ext._counters(cpu, 8) is not stream7
    assert stream7.dtype == torch.int32 and stream7.shape == (3,) and not stream7.any()
    capturing[0] = True
    slots = [cuda_ext._counters(cpu, 7) for _ in range(3)]
    pointers = {t.data_ptr() for t in slots + [stream7, cuda_ext._stream_counters[(None, 8)]]}
    assert len(pointers) == 5 and all(t.shape == (3,) and not t.any() for t in slots)
    with pytest.raises(RuntimeError, match="captured 3 times"):
        cuda_ext._counters(cpu, 7)


def test_the_s_split_covers_k_in_chunks_of_whole_warp_loads():
    for K in (1, 7, 37, 64, 100, 4096, 4104, 14336):
        for x_dtype, a_dtype in ((torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                 (torch.float32, torch.float32)):
            for vector in (True, False):
                k_split, chunk = cuda_ext.s_split(K, x_dtype, a_dtype, vector)
                step = 32 * (16 // a_dtype.itemsize if vector else 1)
                assert chunk % step == 0 and k_split * chunk >= K and (k_split - 1) * chunk < K
                # a block of S reads at most a quarter of a block of W, once K leaves room for it
                if K * x_dtype.itemsize >= 4 * a_dtype.itemsize * step:
                    assert chunk * a_dtype.itemsize <= K * x_dtype.itemsize / 4
    assert cuda_ext.s_split(4096, torch.bfloat16, torch.float32, True) == (8, 512)
