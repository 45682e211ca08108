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

import fastpeft

README = Path(__file__).resolve().parent.parent / "README.md"
PYTHON_LANGUAGES = {"python", "py", "python3"}
GPU_MARK = "gpu"

# CommonMark fences: at most three spaces of indentation, then three or more backticks or tildes; a backtick fence's
# info string cannot hold a backtick (that line is inline code, not a fence).
OPEN_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(?P<title>.*?)(?:[ \t]+#+)?[ \t]*$")


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
    """The fenced code blocks of a Markdown text, in order; raises ValueError on a fence that is never closed."""
    lines = text.splitlines()
    blocks, section, i = [], "", 0
    while i < len(lines):
        opening = OPEN_FENCE.match(lines[i])
        if opening and not (opening["fence"][0] == "`" and "`" in opening["info"]):
            char, length, indent = opening["fence"][0], len(opening["fence"]), len(opening["indent"])
            closing = re.compile(rf"^ {{0,3}}{re.escape(char)}{{{length},}}[ \t]*$")
            start, body = i, []
            i += 1
            while i < len(lines) and not closing.match(lines[i]):
                # Content lines lose up to the opening fence's indentation, as CommonMark renders them.
                body.append(re.sub(rf"^ {{0,{indent}}}", "", lines[i]))
                i += 1
            if i == len(lines):
                raise ValueError(f"line {start + 1}: code fence {opening['fence']!r} is never closed")
            blocks.append(CodeBlock(section, start + 1, opening["info"].strip(), "\n".join(body) + "\n"))
        elif heading := HEADING.match(lines[i]):
            section = heading["title"]
        i += 1
    return blocks


def python_blocks() -> list[CodeBlock]:
    return [b for b in code_blocks(README.read_text(encoding="utf-8")) if b.language in PYTHON_LANGUAGES]


def block_id(index: int, block: CodeBlock) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", block.section.lower()).strip("-") or "top"
    return f"{index}-{slug}"


BLOCKS = python_blocks()


def test_code_blocks_follows_commonmark_fences():
    text = "\n".join([
        "# Top",
        "```python",
        "a = 1",
        "```",
        "## Two words ##",
        "~~~~ py gpu",
        "```",  # the other fence character: content
        "b = 2",
        "~~~~~",
        "``` not a fence: ``inline`` ```",
        "  ```bash",
        "  echo hi",
        "    ```",  # indented four spaces: content, not a closing fence
        "   ```",
        "```",
        "",
        "```",
    ])
    blocks = code_blocks(text)
    assert [(b.section, b.line, b.language, b.marks, b.code) for b in blocks] == [
        ("Top", 2, "python", set(), "a = 1\n"),
        ("Two words", 6, "py", {"gpu"}, "```\nb = 2\n"),
        ("Two words", 11, "bash", set(), "echo hi\n  ```\n"),
        ("Two words", 15, "", set(), "\n"),
    ]
    with pytest.raises(ValueError, match="line 18: code fence '```' is never closed"):
        code_blocks(text + "\n```")


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


@pytest.mark.parametrize("block", BLOCKS, ids=[block_id(i, b) for i, b in enumerate(BLOCKS, 1)])
def test_readme_block_runs(block, block_runs):
    if not runs_here(block):
        pytest.skip(f"README.md line {block.line} ({block.section}): fence marked '{GPU_MARK}', and no CUDA GPU here")
    result = block_runs(block).result()
    if result.returncode != 0:
        pytest.fail(f"README.md line {block.line} ({block.section}) exited with {result.returncode}; stderr:\n"
                    f"{result.stderr[-8000:]}", pytrace=False)
