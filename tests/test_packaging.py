"""What the sdist and the wheel carry: the sdist can build fastpeft._C (csrc/, CMakeLists.txt), both carry the
license, the kernels install as fastpeft.kernels (never a top-level ``kernels``), and the version has one source."""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import fastpeft

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # builds an sdist and a wheel
setuptools = pytest.importorskip("setuptools")
if tuple(int(v) for v in setuptools.__version__.split(".")[:2]) < (77, 0):
    pytest.skip("building needs setuptools >= 77 (the license field)", allow_module_level=True)


def build(kind, out_dir):
    """Build ``kind`` ("sdist" or "wheel") with setuptools' PEP 517 backend, as pip would, without the extension,
    from a clean copy of the source tree (an old egg-info's file list would otherwise fill the sdist)."""
    source = out_dir / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache", ".benchmarks", "*.so"))
    code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out_dir)!r}))"
    env = {**os.environ, "FASTPEFT_CUDA": "0"}
    done = subprocess.run([sys.executable, "-c", code], cwd=source, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out_dir / done.stdout.strip().splitlines()[-1]


def test_sdist_carries_the_sources_of_the_extension_and_the_license(tmp_path):
    sdist = build("sdist", tmp_path)
    assert sdist.name == f"fastpeft-{fastpeft.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    tracked = subprocess.run(["git", "ls-files", "csrc", "kernels"], cwd=ROOT, capture_output=True, text=True)
    wanted = set(tracked.stdout.split()) if tracked.returncode == 0 else set()
    wanted |= {"CMakeLists.txt", "LICENSE", "README.md", "setup.py", "pyproject.toml", "fastpeft/__init__.py"}
    assert wanted <= names, sorted(wanted - names)
    assert any(n.startswith("csrc/") and n.endswith(".cu") for n in names)


def test_wheel_installs_the_kernels_under_fastpeft(tmp_path):
    wheel = build("wheel", tmp_path)
    assert wheel.name.startswith(f"fastpeft-{fastpeft.__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "fastpeft/kernels/__init__.py" in names and "fastpeft/ops/lora_linear.py" in names
    sources = {f"fastpeft/{p.relative_to(ROOT / 'fastpeft').as_posix()}" for p in (ROOT / "fastpeft").rglob("*.py")
               if "kernels" not in p.relative_to(ROOT / "fastpeft").parts}
    assert sources <= set(names), sorted(sources - set(names))  # every subpackage is packaged
    assert not any(n.startswith("kernels/") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(metadata).decode()
    assert f"Version: {fastpeft.__version__}" in text and "License-Expression: Apache-2.0" in text
