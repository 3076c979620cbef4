"""The config files' building blocks, in the package so that config files anywhere can import
them: `base` (every key with its default) and `paper` (the paper's recipes). The repository's
configs/*.py are the command-line handles (`--config configs/paper.py:lima,im,tiny`)."""
