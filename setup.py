"""Build of fastpeft.

- The Triton kernels live in the top-level folder ``kernels/`` and are installed as the subpackage
  ``fastpeft.kernels`` (never as a top-level ``kernels`` module: that name belongs to another PyPI package).
- The CUDA extension ``fastpeft._C`` (``csrc/``, ``CMakeLists.txt``) is built with CMake + ninja according to
  ``FASTPEFT_CUDA``: ``auto`` (default) builds it when nvcc is found and an NVIDIA driver is present (so it will
  be used: a machine with nvcc but no GPU skips the ~2 minute build), ``1`` requires it, ``0`` skips it.
  ``FASTPEFT_CUDA_ARCHS`` (default ``80;90a``) picks the GPU architectures. A CPU-only install always works.
  The build fails if ptxas reports a register spill in any kernel.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def ptxas_spills(log: str) -> list[str]:
    """Kernels for which ``ptxas -v`` reported spill stores or loads, as 'arch function: N/M bytes'."""
    spills, function, arch = [], None, None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
        if entry:
            function, arch = entry.groups()
            continue
        found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if found and function and (int(found.group(1)) or int(found.group(2))):
            spills.append(f"{arch} {function}: {found.group(1)} bytes spill stores, {found.group(2)} bytes spill loads")
    return spills


def nvidia_driver_present() -> bool:
    """True when this machine has an NVIDIA driver: the kernel module's device nodes or its version file."""
    return os.path.exists("/proc/driver/nvidia/version") or any(Path("/dev").glob("nvidia[0-9]*"))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build ``fastpeft._C`` with CMake/ninja, then check the ptxas report for spills."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        build_dir = Path(self.build_temp).resolve() / "fastpeft-cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
                     "-DCMAKE_BUILD_TYPE=Release", f"-DPython3_EXECUTABLE={sys.executable}",
                     f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                     f"-DCMAKE_CUDA_COMPILER={find_nvcc()}",
                     f"-DFASTPEFT_CUDA_ARCHS={os.environ.get('FASTPEFT_CUDA_ARCHS', '80;90a')}"]
        subprocess.run(configure, check=True)
        # ninja replays compiler output (the ptxas report) on stdout; keep it to check for spills.
        built = subprocess.run(["cmake", "--build", str(build_dir), "--parallel"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        (build_dir / "build.log").write_text(built.stdout)
        if built.returncode != 0:
            sys.stderr.write(built.stdout[-20000:])
            raise RuntimeError("building fastpeft._C failed (FASTPEFT_CUDA=0 installs without it)")
        spills = ptxas_spills(built.stdout)
        if spills:
            raise RuntimeError("ptxas reports register spills in fastpeft._C:\n  " + "\n  ".join(spills))
        kernels = len(re.findall(r"Compiling entry function", built.stdout))
        print(f"fastpeft._C: {kernels} kernel builds, no register spills (ptxas log: {build_dir / 'build.log'})")
        [library] = build_dir.glob("_C*.so")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(library, target)


def extensions():
    mode = os.environ.get("FASTPEFT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTPEFT_CUDA must be auto, 0 or 1; got {mode!r}")
    if mode == "0":
        return []
    if find_nvcc() is None:
        if mode == "1":
            raise SystemExit("FASTPEFT_CUDA=1 but nvcc was not found (PATH, CUDACXX, CUDA_HOME)")
        return []
    if mode == "auto" and not nvidia_driver_present():
        print("fastpeft: nvcc found but no NVIDIA driver: not building fastpeft._C (FASTPEFT_CUDA=1 builds it)")
        return []
    return [CMakeExtension("fastpeft._C")]


setup(
    packages=["fastpeft", "fastpeft.ops", "fastpeft.benchmarks", "fastpeft.kernels"],
    package_dir={"fastpeft.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": CMakeBuild},
)
