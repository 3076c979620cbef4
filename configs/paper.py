"""The paper's recipes, `--config configs/paper.py:DATASET,METHOD,MODEL[,lora]`: see
`im_jax/configs/paper.py` for the arguments and the settings each recipe takes."""

from im_jax.configs.paper import get_config  # noqa: F401
