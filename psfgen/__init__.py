"""psfgen: stage 1 of psf-cvae, ray-traced PSF grids in a self-describing HDF5 file.

The public names are imported on first use, so that ``import psfgen`` (and with it the
``psf`` command's ``--help`` and usage errors) does not load torch and DeepLens.
"""

import importlib
import sys
import types

# public name -> the submodule that defines it
_PUBLIC = {"GenerateConfig": ".config", "InputError": ".errors", "generate": ".generate", "GridInfo": ".store",
           "open_info": ".store", "require_complete": ".store"}

__all__ = list(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'psfgen' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Importing a submodule binds it as an attribute of its package; ``psfgen.generate``
    must stay the function whatever was imported first, so that binding is skipped."""

    def __setattr__(self, name, value):
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
