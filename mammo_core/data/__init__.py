"""Datasets: discovery and groups (`datasets`), split protocols and grouped folds (`splits`), decoding them
into model inputs and tf.data batches (`pipeline`)."""
