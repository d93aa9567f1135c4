"""psfcvae: stage 2 of psf-cvae, the conditional VAE over a psfgen grid file.

The public names are imported on first use: ``import psfcvae`` loads neither torch nor
matplotlib until a name that needs them is asked for (``psf --help`` stays fast).
"""

import importlib
import sys
import types

# public name -> the submodule that defines it
_PUBLIC = {"TrainConfig": ".config", "CVAE": ".model", "ModelArgs": ".model", "ModelOutput": ".model",
           "TrainingError": ".train", "train": ".train", "PSFModel": ".api", "load_model": ".api",
           "EvalConfig": ".evaluate", "evaluate": ".evaluate", "render": ".render"}

__all__ = list(_PUBLIC)


def __getattr__(name):
    # psfcvae.train in particular is imported on first use, not here: `torchrun -m psfcvae.train`
    # runs that module as __main__, and importing it with the package first would load it twice.
    if name not in _PUBLIC:
        raise AttributeError(f"module 'psfcvae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Importing a submodule binds it as an attribute of its package; ``psfcvae.train`` and
    ``psfcvae.evaluate`` must stay the functions whatever was imported first."""

    def __setattr__(self, name, value):
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
