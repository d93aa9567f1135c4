"""Stage 2, rendering: an image through the lens, image files, the resolution chart, quality measures."""
