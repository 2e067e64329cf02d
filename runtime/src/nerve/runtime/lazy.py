"""Lazy re-exports (PEP 562): a package's public names, each imported from its module on first use.

`nerve.runtime`, `nerve.runtime.wire` and `nerve.edge` use it so that importing one light module of them
(the lean edge's settings, the MQTT endpoint) does not import the whole package: the edge decides what to
load (OpenSSL or not) before asyncio comes in, and an edge never loads pydantic through `nerve.runtime`.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, module_of: Mapping[str, str]) -> Callable[[str], object]:
    """The module `__getattr__` of `package`: `name` comes from `module_of[name]`, then stays cached.

    Raises `AttributeError` for a name `module_of` does not list, as a missing attribute would.
    """
    namespace = vars(sys.modules[package])

    def attribute(name: str) -> object:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return attribute
