"""Stage 2, the model: the conditional VAE, its layers, the canonical frame, the illumination head, the losses."""
