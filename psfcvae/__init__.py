"""psfcvae: stage 2 of psf-cvae, the conditional VAE over a psfgen grid file."""

from .api import PSFModel, load_model
from .config import TrainConfig
from .evaluate import EvalConfig, evaluate
from .model import CVAE, ModelArgs, ModelOutput
from .render import render

__all__ = ["TrainConfig", "CVAE", "ModelArgs", "ModelOutput", "TrainingError", "train", "PSFModel", "load_model",
           "EvalConfig", "evaluate", "render"]


def __getattr__(name):
    # psfcvae.train is imported on first use, not here: `torchrun -m psfcvae.train` runs
    # that module as __main__, and importing it with the package first would load it twice.
    if name in ("train", "TrainingError"):
        import importlib

        module = importlib.import_module(".train", __name__)
        globals().update(train=module.train, TrainingError=module.TrainingError)
        return globals()[name]
    raise AttributeError(f"module 'psfcvae' has no attribute {name!r}")
