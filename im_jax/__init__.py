"""im_jax: Instruction Modelling (loss over instructions) fine-tuning in JAX/Flax."""

__version__ = "0.1.0"
