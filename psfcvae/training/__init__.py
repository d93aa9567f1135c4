"""Stage 2, training: the config, the data stream, the loop, TensorBoard logs, stopping on a signal."""
