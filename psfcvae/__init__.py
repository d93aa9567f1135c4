"""psfcvae: stage 2 of psf-cvae, the conditional VAE over a psfgen grid file.

The public names are imported on first use: ``import psfcvae`` loads neither torch nor
matplotlib until a name that needs them is asked for (``psf --help`` stays fast).
"""

import importlib

# public name -> the submodule that defines it
_PUBLIC = {
    "TrainConfig": ".config",
    "CVAE": ".model",
    "ModelArgs": ".model",
    "ModelOutput": ".model",
    "TrainingError": ".training",
    "train": ".training",
    "PSFModel": ".api",
    "load_model": ".api",
    "EvalConfig": ".evaluation",
    "evaluate": ".evaluation",
    "render": ".rendering",
}

__all__ = list(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'psfcvae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value
