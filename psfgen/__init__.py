"""psfgen: stage 1 of psf-cvae, ray-traced PSF grids in a self-describing HDF5 file."""

from .config import GenerateConfig
from .errors import InputError
from .generate import generate
from .store import GridInfo, open_info, require_complete

__all__ = ["GenerateConfig", "InputError", "generate", "GridInfo", "open_info", "require_complete"]
