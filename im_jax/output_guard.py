"""Where a command may write: never onto its own input, a training workdir or a CKPT folder.

Every writing command (train, convert, eval generate, report) checks its output path here
before it reads or writes anything, so a refused command leaves every file as it was:

- the output may not be an input, lie inside an input folder, or contain an input;
- a folder that holds training checkpoints (`checkpoints/`, `metrics.jsonl`) or an im_jax CKPT
  (`im_jax.json`) is never replaced, even with --overwrite: a person deletes it by hand.

Standalone (no im_jax imports): the markers below are the file names those folders carry.
"""

import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

PathLike = str | os.PathLike

# name inside a folder -> what it makes the folder (the first match anywhere below it wins)
_PROTECTED_MARKERS = (
    ("checkpoints", "a training workdir (it holds checkpoints/)"),
    ("metrics.jsonl", "a training workdir (it holds metrics.jsonl)"),
    ("im_jax.json", "an im_jax CKPT folder (it holds im_jax.json)"),
)
_SEARCH_DEPTH = 3  # a CKPT or workdir nested deeper than this is not looked for


class UnsafeOutput(ValueError):
  """An output that would overwrite an input or a protected folder; one line for the user."""


def local_path(spec: str) -> pathlib.Path | str | None:
  """The path named by an input spec (`hf:DIR`, a file; a gs:// URI stays a string), or
  None (`synthetic:N`, tfds:)."""
  if not spec:
    return None
  if spec.startswith("hf:"):
    spec = spec[3:]
  elif spec.startswith(("synthetic:", "tfds:")) or spec == "synthetic":
    return None
  return spec if spec.startswith("gs://") else pathlib.Path(spec)


def _resolved(path: PathLike) -> pathlib.PurePath:
  if str(path).startswith("gs://"):  # an object path: compared as text ('//' keeps it apart)
    return pathlib.PurePosixPath("//" + str(path).removeprefix("gs://").rstrip("/"))
  return pathlib.Path(path).expanduser().resolve()


def check_not_input(out: PathLike, inputs: Iterable[PathLike | None] | Mapping[str, Any], *,
                    what: str = "--out") -> None:
  """Refuses `out` equal to, inside, or containing any of `inputs` (None entries ignored).

  `inputs` may map a name for the message (`model.init_from=DIR`) to each path.
  """
  named = inputs.items() if isinstance(inputs, Mapping) else ((None, p) for p in inputs)
  target = _resolved(out)
  for name, given in named:
    if given is None or str(given) == "":
      continue
    source, name = _resolved(given), name or str(given)
    if target == source:
      raise UnsafeOutput(f"{what} {out} is the input {name}; write somewhere else")
    if source in target.parents:
      raise UnsafeOutput(f"{what} {out} is inside the input {name}; write somewhere else")
    if target in source.parents:
      raise UnsafeOutput(f"{what} {out} contains the input {name}; write somewhere else")


def protected_kind(folder: PathLike) -> str | None:
  """What makes `folder` irreplaceable (a training workdir, a CKPT, ...), or None."""
  root = pathlib.Path(folder)
  if not root.is_dir():
    return None
  if root.parent.name == "checkpoints" and root.name.isdigit():
    return "a training checkpoint"
  for current, dirs, files in os.walk(root):
    depth = len(pathlib.Path(current).relative_to(root).parts)
    names = set(dirs) | set(files)
    for marker, kind in _PROTECTED_MARKERS:
      if marker in names:
        return kind if depth == 0 else f"a folder holding {kind.split(' (')[0]} ({current})"
    if depth >= _SEARCH_DEPTH:
      dirs.clear()
  return None


def check_replaceable(out: PathLike, *, what: str = "--out") -> None:
  """Refuses replacing `out` when it is (or holds) a training workdir or a CKPT folder."""
  kind = protected_kind(out)
  if kind is not None:
    raise UnsafeOutput(f"{what} {out} is {kind}; it is never replaced, even with --overwrite "
                       "(delete it yourself if you mean it)")


def check_writable_file(out: PathLike, *, what: str = "--out") -> None:
  """Refuses a file output that is a folder or whose nearest existing folder is read-only."""
  path = pathlib.Path(out)
  if path.is_dir():
    raise UnsafeOutput(f"{what} {out} is a folder; give a file name")
  if path.exists():
    if not os.access(path, os.W_OK):
      raise UnsafeOutput(f"{what} {out} is not writable")
    return
  parent = path.absolute().parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
    raise UnsafeOutput(f"{what} {out} cannot be created: {parent} is not a writable folder")
