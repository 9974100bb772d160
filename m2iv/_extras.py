"""Optional dependencies: import one, or say which pip extra brings it.

``pip install m2iv`` needs torch and numpy only; the rest comes with extras (``setup.py``).
Code that needs an optional module calls :func:`require` (a clear
:class:`~m2iv.errors.MissingDependencyError` instead of a raw ``ModuleNotFoundError``), or
:func:`missing` first where it can do without (skip a plot and say so)::

    plt = require("matplotlib.pyplot", "the loss plot")      # raises, naming m2iv[train]
    why = missing("matplotlib", "the loss plot")             # None, or the sentence to print
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingDependencyError

__all__ = ["EXTRAS", "require", "missing", "install_hint"]

#: top-level module -> (pip distribution, the m2iv extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "triton": ("triton", "triton"),
    "ninja": ("ninja", "ext"),
    "transformers": ("transformers", "hf"),
    "safetensors": ("safetensors", "hf"),
    "tqdm": ("tqdm", "hf"),
    "PIL": ("pillow", "hf"),
    "gguf": ("gguf", "library"),
    "rich": ("rich", "library"),
    "matplotlib": ("matplotlib", "train"),
    "sklearn": ("scikit-learn", "train"),
}


def install_hint(module: str) -> str:
    """``pip install 'm2iv[extra]'`` (or the bare distribution) for ``module``."""
    top = module.split(".", 1)[0]
    dist, extra = EXTRAS.get(top, (top, None))
    if extra is None:
        return f"pip install {dist}"
    return f"pip install 'm2iv[{extra}]' (or: pip install {dist})"


def _message(module: str, purpose: str) -> str:
    top = module.split(".", 1)[0]
    dist = EXTRAS.get(top, (top, None))[0]
    return f"{dist}, needed for {purpose}, is not installed: {install_hint(module)}"


def missing(module: str, purpose: str) -> str | None:
    """``None`` if ``module`` can be imported, else the sentence saying what to install (for
    code that degrades: print it and carry on without ``purpose``)."""
    try:
        found = importlib.util.find_spec(module.split(".", 1)[0]) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else _message(module, purpose)


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.pyplot"``) for ``purpose`` (e.g. ``"the loss
    plot"``), or raise :class:`MissingDependencyError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".", 1)[0]
        if err.name is not None and err.name.split(".", 1)[0] != top:
            raise  # the module is there but one of *its* imports is broken: not ours to name
        raise MissingDependencyError(_message(module, purpose)) from None
