"""Triton kernels of fastpeft, installed as ``fastpeft.kernels``: ``common`` (what every op shares), ``lora_*`` (the
fused LoRA linear, one module per concern, launched from ``lora_linear``), ``adapter_bottleneck``, ``aot`` (the
ahead-of-time compile).

The folder's name is also that of another PyPI package, Hugging Face's ``kernels`` (a dependency of transformers),
and whenever the source tree's root is on ``sys.path`` (``python -c`` or ``python -m`` run there, ``PYTHONPATH`` set
to it, a build's subprocess) ``import kernels`` finds this folder first. Imported under that name, this file gives
the import to the package that owns the name, or fails as if the folder were not there, so that nothing outside
fastpeft ever runs fastpeft's kernels in its place.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _same(a: str, b: str) -> bool:
        """Whether two paths name one file or folder: by identity, so that a bind mount, a case-insensitive file
        system or any other second route into the tree counts as the tree."""
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False

    _here = os.path.dirname(os.path.abspath(__file__))
    _root = os.path.dirname(_here)

    def _elsewhere() -> list[str]:
        """``sys.path`` without the entries that lead to this source tree's root."""
        return [entry for entry in sys.path if not isinstance(entry, str) or not _same(entry or os.curdir, _root)]

    def _owner_spec():
        """The spec the import system would find with the source root off ``sys.path``: every finder on
        ``sys.meta_path`` asked in turn (an editable install's finder included), the path-based one over the rest of
        ``sys.path``; a spec that leads back into this folder is never taken."""
        for finder in sys.meta_path:
            if finder is importlib.machinery.PathFinder:
                spec = finder.find_spec(__name__, _elsewhere())
            elif hasattr(finder, "find_spec"):
                spec = finder.find_spec(__name__, None)
            else:
                continue
            if spec is None:
                continue
            places = [os.path.dirname(spec.origin)] if spec.origin else list(spec.submodule_search_locations or [])
            if any(_same(place, _here) for place in places):
                continue
            return spec
        return None

    sys.modules.pop(__name__, None)  # absent when a caller runs exec_module without registering the module
    _owner = _owner_spec()
    if _owner is None or _owner.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_owner)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds once this file has run
    try:
        _owner.loader.exec_module(_module)
    except BaseException:
        sys.modules.pop(__name__, None)
        raise
