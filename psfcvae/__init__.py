"""psfcvae: stage 2 of psf-cvae, the conditional VAE over a psfgen grid file.

Public names:

    load_model(path) -> PSFModel   a checkpoint written by ``psf train``, ready to answer PSFs
    PSFModel                       a trained model: psf(x, y, depth_m) -> [N, 3, k, k], illumination, ...
    render(model, image, depth)    an image [3, H, W] blurred through the lens, each pixel by its own PSF
    train(cfg) -> Path             train the CVAE on a grid file; returns the run directory
    TrainConfig                    the settings of ``psf train``: data, network, losses, schedule
    TrainingError                  training cannot go on (e.g. a non-finite loss)
    evaluate(cfg) -> dict          the model and the baselines on the held-out points: metrics, figures, report
    EvalConfig                     the settings of ``psf eval``: grid file, checkpoint, output directory
    CVAE                           the network itself (torch.nn.Module)
    ModelArgs                      what rebuilds the network, stored in every checkpoint
    ModelOutput                    the network's named loss terms for one batch

Example::

    import psfcvae
    model = psfcvae.load_model("runs/v1/best.pt")
    psf = model.psf([0.0, 0.5], [0.0, -0.3], depth_m=1.0)   # [2, 3, 15, 15]

The public names are imported on first use: ``import psfcvae`` loads neither torch nor
matplotlib until a name that needs them is asked for (``psf --help`` stays fast);
``dir(psfcvae)`` lists them without importing them, ``help(psfcvae)`` imports them to document each.
"""

from psfgen.shared.lazy import lazy_exports as _lazy_exports

# public name -> the submodule that defines it
_PUBLIC = {
    "TrainConfig": ".training.config",
    "CVAE": ".model.cvae",
    "ModelArgs": ".model.cvae",
    "ModelOutput": ".model.cvae",
    "TrainingError": ".training.loop",
    "train": ".training.loop",
    "PSFModel": ".api.psfmodel",
    "load_model": ".api.psfmodel",
    "EvalConfig": ".evaluation.evaluate",
    "evaluate": ".evaluation.evaluate",
    "render": ".rendering.render",
}

__all__ = list(_PUBLIC)


__getattr__, __dir__ = _lazy_exports(__name__, _PUBLIC)
