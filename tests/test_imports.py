"""How fastpeft imports.

The package is layered: every import inside fastpeft (function-level ones included) goes down the table below, or
sideways within one layer without a cycle. So the shared definitions sit at the bottom, the kernels never reach up
into the ops, and nothing cycles through ``backends``.

The kernels are ``fastpeft.kernels`` only: run from the source root, ``import kernels`` never finds kernels/ (the
name is Hugging Face's hub-kernels package, which transformers imports)."""
import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module may import from its own layer or any lower one.
LAYERS = [
    ["fastpeft.checks", "fastpeft.environment", "fastpeft.atomic_files", "fastpeft._C", "fastpeft.quantized",
     "fastpeft.nf4"],
    ["fastpeft.cuda_ext", "fastpeft.kernels", "fastpeft.kernels.*"],
    ["fastpeft.auto", "fastpeft.backends"],
    ["fastpeft.ops", "fastpeft.ops.*"],
    ["fastpeft.layers"],
    ["fastpeft.model"],
    ["fastpeft.peft_io", "fastpeft.peft_convert", "fastpeft.peft_fuse"],
    ["fastpeft.merging"],
    ["fastpeft.benchmarks", "fastpeft.benchmarks.measure", "fastpeft.benchmarks.timing",
     "fastpeft.benchmarks.peft_step", "fastpeft.benchmarks.merging", "fastpeft.benchmarks.ia3"],
    ["fastpeft.benchmarks.report"],
    ["fastpeft", "fastpeft.__main__"],
]


def modules() -> dict[str, Path]:
    """Every module of the installed package, by name (kernels/ installs as fastpeft.kernels)."""
    found = {}
    for folder, package in ((ROOT / "fastpeft", "fastpeft"), (ROOT / "kernels", "fastpeft.kernels")):
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def layer_of(name: str) -> int:
    for level, patterns in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return level
    raise AssertionError(f"{name} is in no layer of tests/test_imports.py: place it")


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """The fastpeft modules that ``name`` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names if alias.name.split(".")[0] == "fastpeft"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "fastpeft":
                continue
            for alias in node.names:  # "from pkg import module" imports the module
                child = f"{source}.{alias.name}"
                targets.add(child if child in known or child == "fastpeft._C" else source)
    return targets - {name}


def test_imports_go_down_the_layers_and_never_cycle():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    upward = [f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
              for name, targets in graph.items() for target in targets
              if target != "fastpeft" and layer_of(target) > layer_of(name)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)

    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import cycle: " + " -> ".join(trail + [node])
        state[node] = "open"
        for target in graph.get(node, ()):
            if target != "fastpeft":  # every submodule imports its package first; that is not a cycle
                visit(target, trail + [node])
        state[node] = "done"

    for name in graph:
        visit(name, [])
    assert "fastpeft.checks" in graph and not graph["fastpeft.checks"], "checks must import nothing from fastpeft"


# ----------------------------------------------------------------------------------------------------------
# The folder kernels/ and the PyPI package "kernels" (Hugging Face's hub kernels, a dependency of transformers)
# ----------------------------------------------------------------------------------------------------------

def run_in_root(code: str, *, extra_path: list[str] = (), cwd=ROOT, site_packages=True):
    """Run ``python -c code`` from ``cwd`` (the source root by default), where ``''`` leads sys.path to kernels/, as
    it does for ``python -c`` / ``python -m`` there; ``extra_path`` goes on PYTHONPATH; without ``site_packages``
    (``python -S``) no installed package, HF's ``kernels`` included, is on sys.path."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(map(str, extra_path))
    return subprocess.run([sys.executable, *([] if site_packages else ["-S"]), "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def fake_kernels(tmp_path):
    """A package named ``kernels`` of another owner, in its own folder, with a submodule."""
    package = tmp_path / "site" / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("OWNER = 'someone else'\n")
    (package / "_internals.py").write_text("VALUE = 42\n")
    return tmp_path / "site"


def test_import_kernels_from_the_source_root_gets_the_package_that_owns_the_name(tmp_path):
    site = fake_kernels(tmp_path)
    done = run_in_root("import kernels, kernels._internals; print(kernels.OWNER, kernels._internals.VALUE, "
                       "kernels.__file__, sep='|')", extra_path=[site])
    assert done.returncode == 0, done.stderr
    owner, value, path = done.stdout.strip().split("|")
    assert (owner, value) == ("someone else", "42") and path.startswith(str(site)), done.stdout
    # The root reached through a symlink, and as a relative entry of PYTHONPATH, is the same root.
    link = tmp_path / "tree"
    link.symlink_to(ROOT)
    done = run_in_root("import kernels; print(kernels.OWNER)", extra_path=[".", site], cwd=link)
    assert done.returncode == 0 and done.stdout.strip() == "someone else", done.stderr


def test_import_kernels_from_the_source_root_never_finds_the_folder():
    """Without another package of that name (no site-packages, so not even HF's) the import fails as if the folder
    were absent, and leaves nothing in sys.modules. With HF's: test_peft_transformers_and_bitsandbytes_import_..."""
    done = run_in_root("import sys\n"
                       "try:\n    import kernels\nexcept ModuleNotFoundError as err:\n"
                       "    print('absent', err.name, 'kernels' in sys.modules)\n"
                       "else:\n    print('found', kernels.__file__)", site_packages=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["absent", "kernels", "False"], done.stdout


def test_an_owner_found_by_another_finder_is_imported(tmp_path):
    """An owner that only a finder on sys.meta_path knows (an editable install's) is imported from the root too."""
    site = fake_kernels(tmp_path)
    done = run_in_root(
        "import importlib.util, sys\n"
        "class Editable:\n"
        "    @classmethod\n"
        "    def find_spec(cls, name, path=None, target=None):\n"
        "        if name != 'kernels':\n"
        "            return None\n"
        f"        return importlib.util.spec_from_file_location(name, {str(site / 'kernels' / '__init__.py')!r},\n"
        f"            submodule_search_locations=[{str(site / 'kernels')!r}])\n"
        "sys.meta_path.append(Editable)\n"
        "import kernels, kernels._internals; print(kernels.OWNER, kernels._internals.VALUE)", site_packages=False)
    assert done.returncode == 0 and done.stdout.strip() == "someone else 42", done.stderr


def test_a_second_route_into_the_tree_is_the_tree(tmp_path):
    """The root bind-mounted elsewhere (a path no realpath maps back) and put on PYTHONPATH: the import must not
    hand over to the folder again through it (it once recursed without end)."""
    import shutil
    import subprocess
    import sys
    site, mount = fake_kernels(tmp_path), tmp_path / "mount"
    mount.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private mount namespace")
    script = (f"mount --bind {ROOT} {mount} && cd {ROOT} && PYTHONPATH={mount}:{site} {sys.executable} -c "
              "'import kernels; print(kernels.OWNER)'")
    done = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script], capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0 and "mount" in done.stderr and "kernels" not in done.stderr:
        pytest.skip(f"cannot bind-mount in a private namespace here: {done.stderr.strip()}")
    assert done.returncode == 0 and done.stdout.strip() == "someone else", done.stderr[-3000:]


def test_fastpeft_kernels_still_import_as_fastpeft_kernels():
    pytest.importorskip("triton")
    done = run_in_root("import fastpeft.kernels.common as c, sys; print(c.__name__, 'kernels' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["fastpeft.kernels.common", "False"]


def test_peft_transformers_and_bitsandbytes_import_from_the_source_root():
    """transformers >= 5.25 imports HF's ``kernels``; from the root it must get that package, not kernels/."""
    import importlib.util

    import pytest
    wanted = [m for m in ("kernels", "transformers", "peft", "bitsandbytes") if importlib.util.find_spec(m)]
    if "transformers" not in wanted:
        pytest.skip("transformers is not installed")
    done = run_in_root(f"import {', '.join(wanted)}; import kernels; print(kernels.__file__)")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not done.stdout.split()[-1].startswith(str(ROOT / "kernels")), done.stdout
    assert "cannot import name" not in done.stderr, done.stderr[-3000:]
