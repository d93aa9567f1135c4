"""psfgen: stage 1 of psf-cvae, ray-traced PSF grids in a self-describing HDF5 file.

Public names:

    generate(cfg) -> Path     trace the PSF grid that a GenerateConfig asks for into an HDF5 file
    GenerateConfig            the settings of ``psf generate``: lens, grid size, depths [m], rays, output
    GridFile                  a checked grid file: GridFile.open(path) gives its header, depths [m] and PSF readers
    InputError                bad input (a config value, a file, a path): a one-line message

Example::

    from psfgen import GenerateConfig, generate
    path = generate(GenerateConfig(lens="cooke_triplet_f5", out="grid.h5"))  # a shipped lens, default grid and depths

The public names are imported on first use, so that ``import psfgen`` (and with it the
``psf`` command's ``--help`` and usage errors) does not load torch and DeepLens;
``dir(psfgen)`` lists them without importing them, ``help(psfgen)`` imports them to document each.
"""

from psfgen.shared.lazy import lazy_exports as _lazy_exports

# public name -> the submodule that defines it
_PUBLIC = {
    "GenerateConfig": ".config",
    "InputError": ".shared.errors",
    "generate": ".generation",
    "GridFile": ".gridfile",
}

__all__ = list(_PUBLIC)


__getattr__, __dir__ = _lazy_exports(__name__, _PUBLIC)
