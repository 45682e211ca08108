"""The package is layered: every import inside fastpeft (function-level ones included) goes down the table below, or
sideways within one layer without a cycle. So the shared definitions sit at the bottom, the kernels never reach up
into the ops, and nothing cycles through ``backends``."""
import ast
import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module may import from its own layer or any lower one.
LAYERS = [
    ["fastpeft.checks", "fastpeft._C", "fastpeft.nf4"],
    ["fastpeft.cuda_ext", "fastpeft.kernels", "fastpeft.kernels.*"],
    ["fastpeft.auto", "fastpeft.backends"],
    ["fastpeft.ops", "fastpeft.ops.*"],
    ["fastpeft.layers"],
    ["fastpeft.model"],
    ["fastpeft.peft_io", "fastpeft.peft_convert"],
    ["fastpeft.benchmark"],
    ["fastpeft.report"],
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
