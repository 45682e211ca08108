"""Triton kernels of fastpeft, installed as ``fastpeft.kernels`` (one module per op).

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

    def _elsewhere() -> list[str]:
        """``sys.path`` without the entries that lead to this source tree's root."""
        root = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
        return [entry for entry in sys.path
                if not isinstance(entry, str) or os.path.realpath(entry or os.curdir) != root]

    del sys.modules[__name__]
    _owner = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere())
    if _owner is None or _owner.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_owner)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds once this file has run
    try:
        _owner.loader.exec_module(_module)
    except BaseException:
        sys.modules.pop(__name__, None)
        raise
