"""psfcvae: stage 2 of psf-cvae, the conditional VAE over a psfgen grid file."""

from .config import TrainConfig
from .model import CVAE, ModelArgs, ModelOutput
from .train import TrainingError, train

__all__ = ["TrainConfig", "CVAE", "ModelArgs", "ModelOutput", "TrainingError", "train"]

from .api import PSFModel, load_model  # noqa: E402

__all__ += ["PSFModel", "load_model"]

from .evaluate import EvalConfig, evaluate  # noqa: E402

__all__ += ["EvalConfig", "evaluate"]
