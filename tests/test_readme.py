"""Every ```python block of README.md runs as written, each alone in a fresh interpreter.

A block runs with the interpreter running the tests, in an empty temporary working directory (adapter folders and
checkpoints it writes land there), with the Hugging Face hub offline, so a block that would download fails here.
Blocks are self-contained: none relies on names defined by an earlier block.

Marking a block: a block that needs a CUDA GPU opens with the fence ```python gpu (GitHub highlights it as Python
still); it is skipped, saying so, where torch sees no GPU. Other fences (```bash, plain ```) are not run.

A failure shows the block's stderr. Its traceback's line numbers are README.md's own: the block is run from a file
named README.md with the code at the lines it has in the real one.
"""
import os
import re
import site
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from markdown_it import MarkdownIt

import fastpeft

README = Path(__file__).resolve().parent.parent / "README.md"
PYTHON_LANGUAGES = {"python", "py", "python3"}
GPU_MARK = "gpu"


@dataclass(frozen=True)
class CodeBlock:
    section: str  # the heading above the block ("" before the first)
    line: int  # README line of the opening fence, 1-based
    info: str  # the fence's info string: language, then marks
    code: str

    @property
    def language(self) -> str:
        return self.info.split()[0].lower() if self.info.split() else ""

    @property
    def marks(self) -> set[str]:
        return set(self.info.split()[1:])


def code_blocks(text: str) -> list[CodeBlock]:
    """The fenced code blocks of a Markdown text, in order, as a CommonMark renderer reads them."""
    tokens = MarkdownIt("commonmark").parse(text)
    blocks, section = [], ""
    for token, following in zip(tokens, tokens[1:] + [None], strict=True):
        if token.type == "heading_open":
            section = following.content
        elif token.type == "fence":
            blocks.append(CodeBlock(section, token.map[0] + 1, token.info.strip(), token.content))
    return blocks


def python_blocks() -> list[CodeBlock]:
    return [b for b in code_blocks(README.read_text(encoding="utf-8")) if b.language in PYTHON_LANGUAGES]


def block_id(index: int, block: CodeBlock) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", block.section.lower()).strip("-") or "top"
    return f"{index}-{slug}"


BLOCKS = python_blocks()


def test_code_blocks_reads_sections_languages_and_marks():
    text = "# Top\n```python\na = 1\n```\n## Two words\n~~~~ py gpu\n```\nb = 2\n~~~~\n"
    assert [(b.section, b.line, b.language, b.marks, b.code) for b in code_blocks(text)] == [
        ("Top", 2, "python", set(), "a = 1\n"), ("Two words", 6, "py", {"gpu"}, "```\nb = 2\n")]


def test_readme_has_its_python_blocks():
    # A parser that found nothing would pass every block test vacuously.
    assert len(BLOCKS) >= 7, [b.line for b in BLOCKS]
    assert all(b.code.strip() for b in BLOCKS)


def block_env() -> dict[str, str]:
    env = dict(os.environ)
    # A source tree that pytest or PYTHONPATH put on sys.path must reach the blocks, whatever their cwd, so they
    # import the fastpeft under test. An installed one is found anyway, and site-packages on PYTHONPATH would come
    # before the standard library.
    package_root = Path(fastpeft.__file__).resolve().parent.parent
    site_dirs = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if package_root not in site_dirs:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(package_root), env.get("PYTHONPATH")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_block(block: CodeBlock, directory: Path) -> subprocess.CompletedProcess:
    script = directory / "README.md"
    script.write_text("\n" * block.line + block.code, encoding="utf-8")
    cwd = directory / "cwd"
    cwd.mkdir()
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=block_env(), capture_output=True, text=True,
                          timeout=600)


def runs_here(block: CodeBlock) -> bool:
    return GPU_MARK not in block.marks or torch.cuda.is_available()


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.fixture(scope="module")
def block_runs(request, tmp_path_factory):
    """Each block's run, as a future. A block spends seconds importing torch and transformers on one core, so the
    blocks selected for this session start together, one per CPU (at most four: each interpreter takes about half a
    GB), each test waiting for its own. Under pytest-xdist, whose workers each see every item, a block starts only
    when its test asks."""
    pool = ThreadPoolExecutor(max_workers=max(1, min(cpus(), 4)))
    futures = {}

    def start(block):
        if block not in futures:
            directory = tmp_path_factory.mktemp(f"readme-line{block.line}-")
            futures[block] = pool.submit(run_block, block, directory)
        return futures[block]

    if not hasattr(request.config, "workerinput"):
        for item in request.session.items:
            if getattr(item, "function", None) is test_readme_block_runs and runs_here(item.callspec.params["block"]):
                start(item.callspec.params["block"])
    yield start
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[block_id(i, b) for i, b in enumerate(BLOCKS, 1)])
def test_readme_block_runs(block, block_runs):
    if not runs_here(block):
        pytest.skip(f"README.md line {block.line} ({block.section}): fence marked '{GPU_MARK}', and no CUDA GPU here")
    result = block_runs(block).result()
    if result.returncode != 0:
        pytest.fail(f"README.md line {block.line} ({block.section}) exited with {result.returncode}; stderr:\n"
                    f"{result.stderr[-8000:]}", pytrace=False)
