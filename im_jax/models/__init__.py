"""Models: the Flax NNX Llama family and its attention."""
