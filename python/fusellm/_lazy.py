"""Module attributes imported on first use (PEP 562), for the packages whose names live in
modules that import torch, transformers, datasets or the Rust extension."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_getattr(package: str, owners: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``owners`` maps each name to the submodule
    (relative to ``package``) that defines it; the value is cached on the package once read."""

    def __getattr__(name: str) -> object:
        module = owners.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
