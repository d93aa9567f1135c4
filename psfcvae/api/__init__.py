"""Stage 2, the Python API: PSFModel and load_model, the model's table, psf sample."""
