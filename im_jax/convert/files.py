"""Folder plumbing shared by the CKPT and HF writers: atomic folders and tokenizers."""

import contextlib
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

from im_jax import output_guard
from im_jax.data.stats import load_tokenizer

PathLike = str | os.PathLike


@contextlib.contextmanager
def atomic_dir(out: PathLike, *, overwrite: bool = False) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling of `out`, renamed to `out` only when the body succeeds.

  A reader therefore never sees a half-written folder under the final name; a killed writer
  leaves only `.NAME.partial`, which the next write to the same place removes. A training
  workdir or a CKPT folder is never replaced (`output_guard.check_replaceable`).
  """
  out = pathlib.Path(out).absolute()
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} already exists (use --overwrite / overwrite=True to replace it)")
  if out.exists():
    if not out.is_dir():
      raise FileExistsError(f"{out} is a file, not a folder; it is not replaced")
    output_guard.check_replaceable(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.partial"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if out.exists():  # overwrite: swap, then delete the old folder
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, out)


def as_tokenizer(tokenizer: Any) -> Any:
  """A transformers tokenizer from a folder path (`load_tokenizer`), or the tokenizer object."""
  if isinstance(tokenizer, (str, os.PathLike)):
    return load_tokenizer(str(tokenizer))
  return tokenizer
