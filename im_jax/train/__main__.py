"""`python -m im_jax.train`: the train command, im_jax/run/train.py.

`__main__` modules are entry points, the top layer, wherever they sit for their `python -m`
name: they may import `im_jax.run`; the library modules beside them may not.
"""

from im_jax.run.train import main, run_from_command_line  # noqa: F401  (main: in-process use)

if __name__ == "__main__":
  run_from_command_line()
