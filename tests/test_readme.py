"""Every ```python block of README.md and of each docs/*.md page runs as written, each alone in a fresh interpreter;
every relative link in them points to a file (and heading) that exists.

A block runs with the interpreter running the tests, in an empty temporary working directory (adapter folders and
checkpoints it writes land there), with the Hugging Face hub offline, so a block that would download fails here.
Blocks are self-contained: none relies on names or files from an earlier block, of its page or another.

Marking a block: a block that needs a CUDA GPU opens with the fence ```python gpu (GitHub highlights it as Python
still); it is skipped, saying so, where torch sees no GPU. Other fences (```bash, plain ```) are not run.

A failure shows the block's stderr. Its traceback's file and line numbers are the page's own: the block is run from a
file of the page's name (README.md, docs/api.md, ...) with the code at the lines it has in the real one.
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

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]  # the Markdown pages whose blocks run and whose links are checked
PYTHON_LANGUAGES = {"python", "py", "python3"}
GPU_MARK = "gpu"


@dataclass(frozen=True)
class CodeBlock:
    section: str  # the heading above the block ("" before the first)
    line: int  # the page's line of the opening fence, 1-based
    info: str  # the fence's info string: language, then marks
    code: str
    page: str = ""  # the page's path from the repository root, "/"-separated: README.md, docs/api.md, ...

    @property
    def language(self) -> str:
        return self.info.split()[0].lower() if self.info.split() else ""

    @property
    def marks(self) -> set[str]:
        return set(self.info.split()[1:])


def code_blocks(text: str, page: str = "") -> list[CodeBlock]:
    """The fenced code blocks of a Markdown text, in order, as a CommonMark renderer reads them."""
    tokens = MarkdownIt("commonmark").parse(text)
    blocks, section = [], ""
    for token, following in zip(tokens, tokens[1:] + [None], strict=True):
        if token.type == "heading_open":
            section = following.content
        elif token.type == "fence":
            blocks.append(CodeBlock(section, token.map[0] + 1, token.info.strip(), token.content, page))
    return blocks


def page_name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def python_blocks() -> list[CodeBlock]:
    return [b for path in PAGES for b in code_blocks(path.read_text(encoding="utf-8"), page_name(path))
            if b.language in PYTHON_LANGUAGES]


def block_ids(blocks: list[CodeBlock]) -> list[str]:
    """page-index-section, the index counting the page's Python blocks from 1: README-2-a-tour, api-1-top, ..."""
    ids, counts = [], {}
    for block in blocks:
        counts[block.page] = counts.get(block.page, 0) + 1
        slug = re.sub(r"[^a-z0-9]+", "-", block.section.lower()).strip("-") or "top"
        ids.append(f"{Path(block.page).stem}-{counts[block.page]}-{slug}")
    return ids


BLOCKS = python_blocks()


def test_code_blocks_reads_sections_languages_and_marks():
    text = "# Top\n```python\na = 1\n```\n## Two words\n~~~~ py gpu\n```\nb = 2\n~~~~\n"
    assert [(b.section, b.line, b.language, b.marks, b.code) for b in code_blocks(text)] == [
        ("Top", 2, "python", set(), "a = 1\n"), ("Two words", 6, "py", {"gpu"}, "```\nb = 2\n")]


def test_readme_and_docs_have_their_python_blocks():
    # A parser or a glob that found nothing would pass every block test vacuously.
    assert len(DOCS) >= 10, DOCS
    readme = [b for b in BLOCKS if b.page == "README.md"]
    assert len(readme) >= 3, [b.line for b in readme]
    assert len(BLOCKS) >= 10, [(b.page, b.line) for b in BLOCKS]
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
    script = directory / block.page
    script.parent.mkdir(parents=True, exist_ok=True)
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
            directory = tmp_path_factory.mktemp(f"{Path(block.page).stem}-line{block.line}-")
            futures[block] = pool.submit(run_block, block, directory)
        return futures[block]

    if not hasattr(request.config, "workerinput"):
        for item in request.session.items:
            if getattr(item, "function", None) is test_readme_block_runs and runs_here(item.callspec.params["block"]):
                start(item.callspec.params["block"])
    yield start
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=block_ids(BLOCKS))
def test_readme_block_runs(block, block_runs):
    if not runs_here(block):
        pytest.skip(f"{block.page} line {block.line} ({block.section}): fence marked '{GPU_MARK}', and no CUDA GPU "
                    f"here")
    result = block_runs(block).result()
    if result.returncode != 0:
        pytest.fail(f"{block.page} line {block.line} ({block.section}) exited with {result.returncode}; stderr:\n"
                    f"{result.stderr[-8000:]}", pytrace=False)


# Links: every relative link or image of a page points to a file or folder of the tree, and an anchor (#part) to a
# heading of the page it names, as GitHub names headings.
LINK_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # https:, mailto:, ...


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every link and image of a Markdown text, as a CommonMark renderer reads them."""
    found = []
    for token in MarkdownIt("commonmark").parse(text):
        for child in token.children or []:
            if child.type == "link_open":
                found.append((token.map[0] + 1, child.attrs["href"]))
            elif child.type == "image":
                found.append((token.map[0] + 1, child.attrs["src"]))
    return found


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: the heading's text in lower case, punctuation but '-' and '_'
    dropped, spaces made '-'; a repeated one gets -1, -2, ..."""
    anchors, seen = set(), {}
    tokens = MarkdownIt("commonmark").parse(text)
    for token, following in zip(tokens, tokens[1:] + [None], strict=True):
        if token.type == "heading_open":
            plain = "".join(c.content for c in following.children if c.type in ("text", "code_inline"))
            slug = re.sub(r"[^\w\- ]", "", plain.strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_links_reads_links_images_and_headings():
    text = "# A `b`'s (c) d\n\nSee [x](docs/x.md#y), ![i](p.png) and <https://e.org>.\n\n## A `b`'s (c) d\n"
    assert links(text) == [(3, "docs/x.md#y"), (3, "p.png"), (3, "https://e.org")]
    assert heading_anchors(text) == {"a-bs-c-d", "a-bs-c-d-1"}


LINK_PAGES = [README, *DOCS, ROOT / "bench" / "results" / "README.md"]


@pytest.mark.parametrize("page", LINK_PAGES, ids=[page_name(p) for p in LINK_PAGES])
def test_relative_links_resolve(page):
    broken = []
    for line, target in links(page.read_text(encoding="utf-8")):
        if LINK_SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or ROOT not in file.parents:
            broken.append(f"line {line}: {target} (no such file in the tree)")
        elif anchor and (file.suffix != ".md" or anchor not in heading_anchors(file.read_text(encoding="utf-8"))):
            broken.append(f"line {line}: {target} (no heading #{anchor} there)")
    assert not broken, f"{page_name(page)}: " + "; ".join(broken)


def test_readme_links_every_docs_page():
    linked = {(README.parent / target.partition("#")[0]).resolve() for _, target in links(README.read_text("utf-8"))}
    assert set(DOCS) - linked == set(), "docs pages the README does not link"


def test_readme_is_a_front_door():
    """Short (under 250 lines, no paragraph over 12), and it opens with the two commands: install and run the main
    job, install and pass the tests."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    tokens = MarkdownIt("commonmark").parse(text)
    paragraphs = [t.map for t in tokens if t.type == "paragraph_open"]
    longest = max(paragraphs, key=lambda m: m[1] - m[0])
    assert longest[1] - longest[0] <= 12, f"README.md lines {longest[0] + 1}-{longest[1]}"
    first = code_blocks(text)[0]
    assert first.language == "bash"
    commands = [line for line in first.code.splitlines() if line and not line.startswith("#")]
    assert commands == ['pip install torch==2.13.0 && pip install -e ".[bench]" && python -m fastpeft bench --quick',
                        'pip install torch==2.13.0 && pip install -e ".[test]" && pytest']
