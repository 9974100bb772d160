"""Package attributes imported on first access (PEP 562), so that importing a package stays
cheap: ``m2iv --help`` and ``m2iv train --help`` never import torch."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, table: dict[str, str],
                    namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``, whose public name ``n`` is defined in the
    module ``table[n]`` (relative to the package); a resolved name is kept in ``namespace``
    (the package's ``globals()``), so each is imported once."""
    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name], package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
