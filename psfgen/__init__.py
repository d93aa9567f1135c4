"""psfgen: stage 1 of psf-cvae, ray-traced PSF grids in a self-describing HDF5 file.

The public names are imported on first use, so that ``import psfgen`` (and with it the
``psf`` command's ``--help`` and usage errors) does not load torch and DeepLens.
"""

from .shared.lazy import lazy_exports

# public name -> the submodule that defines it
_PUBLIC = {
    "GenerateConfig": ".config",
    "InputError": ".shared.errors",
    "generate": ".generation",
    "GridFile": ".store",
}

__all__ = list(_PUBLIC)


__getattr__ = lazy_exports(__name__, _PUBLIC)
