"""Public names of a package imported on first use (PEP 562), so that importing the package
(and with it ``psf --help``) loads neither torch, DeepLens nor matplotlib."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, public: dict[str, str]):
    """A module's ``(__getattr__, __dir__)`` for ``package``: public name -> the submodule (relative)
    that defines it. ``dir(package)`` lists the public names before any is imported; asking for
    one's value (``getattr``, ``help``) imports its submodule."""

    def __getattr__(name: str):
        if name not in public:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(public[name], package), name)
        setattr(sys.modules[package], name, value)  # found directly from now on
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(public))

    return __getattr__, __dir__
