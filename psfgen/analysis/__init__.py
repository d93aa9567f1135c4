"""Stage 1, reading a grid file for people: psf info, the lit field, the sampling check, the lens's symmetry."""
