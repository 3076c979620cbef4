"""Training: loss, optimiser, mesh/sharding, the jit train and eval steps."""
