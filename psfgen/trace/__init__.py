"""Stage 1, tracing: the lens file, DeepLens's ray tracing with its rays counted, the exact-area downsampling."""
