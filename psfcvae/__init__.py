"""psfcvae: stage 2 of psf-cvae, the conditional VAE over a psfgen grid file."""
