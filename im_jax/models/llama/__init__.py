"""Llama family (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2): config, model, HF parameter table."""

from im_jax.models.llama.config import LlamaConfig, RopeScaling, num_params, training_flops
from im_jax.models.llama.model import Llama

__all__ = ["Llama", "LlamaConfig", "RopeScaling", "num_params", "training_flops"]
