"""Every key an im_jax training run reads, with its default: `im_jax/configs/base.py`.

Start your own config file from it, anywhere (configs/demo.py is a short example):

    from im_jax.configs import base

    def get_config():
      c = base.get_config()
      c.data.train = "my_data.jsonl"
      return c
"""

from im_jax.configs.base import get_config  # noqa: F401
