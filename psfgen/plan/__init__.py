"""Stage 1, planning the grid: field points, neighbours and held-out points, the ray budget, the depths."""
