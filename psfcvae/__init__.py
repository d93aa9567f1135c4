"""psfcvae: stage 2 of psf-cvae, the conditional VAE over a psfgen grid file.

The public names are imported on first use: ``import psfcvae`` loads neither torch nor
matplotlib until a name that needs them is asked for (``psf --help`` stays fast).
"""

from psfgen.shared.lazy import lazy_exports

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


__getattr__ = lazy_exports(__name__, _PUBLIC)
