"""Hugging Face Hub names (`hf:ORG/NAME`) as local folders and files, through huggingface_hub.

`hf:X` has always meant the local folder X; it now also takes a Hub repository id. An existing
local path wins; otherwise X is looked up in the local Hugging Face cache (`HF_HOME`,
`HF_HUB_CACHE`) with huggingface_hub's own resolution (refs, snapshots), and downloaded only
when `HF_HUB_OFFLINE` is not set. A name found nowhere is one `HubError` line.

Only safetensors, JSON and tokenizer files of a model repository are fetched (never pickled
weights). A dataset `hf:ORG/NAME[:SPLIT]` names the Parquet / JSON / JSON-lines files of a
dataset repository for SPLIT (default train): files named after the split (`train.jsonl`,
`data/train-00000-of-00002.parquet`) or inside a folder named after it; when no file is named
after any split, the default split is every data file.

Standalone (no im_jax imports): data, models and entry points all use it.
"""

import pathlib
import re

PREFIX = "hf:"
DATA_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json")
_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
_DATA_FILES = [f"*{suffix}" for suffix in DATA_SUFFIXES]
_SPLITS = ("train", "validation", "valid", "val", "test", "dev")
# JSON files of a dataset repository that describe it rather than hold records.
_METADATA = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}


class HubError(ValueError):
  """A `hf:` name that is neither a local path nor in (or fetchable into) the HF cache."""


def folder(spec: str) -> pathlib.Path:
  """The local folder of a model or tokenizer spec: `hf:DIR`, `hf:ORG/NAME` or a plain DIR."""
  name = spec.removeprefix(PREFIX)
  path = pathlib.Path(name).expanduser()
  if path.exists() or not spec.startswith(PREFIX):
    return path
  return _snapshot(name, "model", _MODEL_FILES)


def dataset_files(spec: str) -> list[pathlib.Path]:
  """The data files of `hf:FILE`, `hf:DIR[:SPLIT]` or `hf:ORG/NAME[:SPLIT]`, sorted."""
  body = spec.removeprefix(PREFIX)
  if pathlib.Path(body).expanduser().is_file():
    return [pathlib.Path(body).expanduser()]
  name, split = body, None
  if not pathlib.Path(body).expanduser().exists() and ":" in body:
    name, split = body.rsplit(":", 1)
    if not split:
      raise HubError("empty split after ':'")
  local = pathlib.Path(name).expanduser()
  root = local if local.is_dir() else _snapshot(name, "dataset", _DATA_FILES)
  return _split_files(root, split)


def _split_files(root: pathlib.Path, split: str | None) -> list[pathlib.Path]:
  files = sorted(p for p in root.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file()
                 and p.name not in _METADATA
                 and not any(part.startswith(".") for part in p.relative_to(root).parts))
  if not files:
    raise HubError(f"no Parquet or JSON data files in {root}")
  wanted = _named_after(files, root, split or "train")
  if wanted:
    return wanted
  if split is None and not any(_named_after(files, root, s) for s in _SPLITS):
    return files
  shown = ", ".join(str(p.relative_to(root)) for p in files[:5])
  raise HubError(f"no data file for split {split or 'train'!r} in {root} (files: {shown}"
                 f"{', ...' if len(files) > 5 else ''})")


def _named_after(files: list[pathlib.Path], root: pathlib.Path, split: str) -> list[pathlib.Path]:
  """Files in a folder called `split`, or whose name has `split` as a word (`train-0001`)."""
  word = re.compile(rf"(?:^|[-._ 0-9]){re.escape(split)}(?:$|[-._ 0-9])")
  return [p for p in files
          if split in p.relative_to(root).parts[:-1] or word.search(p.name[:-len(p.suffix)])]


def _snapshot(repo_id: str, repo_type: str, patterns: list[str]) -> pathlib.Path:
  """The cached snapshot folder of a repository; downloaded unless HF_HUB_OFFLINE is set."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top  (only hub names pay for it)
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top

  kind = "model" if repo_type == "model" else "dataset"
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(
        repo_id, repo_type=repo_type, allow_patterns=patterns, local_files_only=True))
  except errors.HFValidationError:
    raise HubError(f"no such local path, and not a Hub {kind} name (ORG/NAME)"
                   ) from None
  except (errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError):
    pass
  cache = huggingface_hub.constants.HF_HUB_CACHE
  fetch = f"hf download {repo_id}" + ("" if repo_type == "model" else " --repo-type dataset")
  if huggingface_hub.is_offline_mode():
    raise HubError(f"no such local path, and no {kind} {repo_id} in the Hugging "
                   f"Face cache {cache} (HF_HUB_OFFLINE is set; fetch it with `{fetch}`)")
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(
        repo_id, repo_type=repo_type, allow_patterns=patterns))
  except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError, ValueError) as e:
    reason = " ".join(str(e).split())[:300]
    raise HubError(f"no such local path, {repo_id} is not in the Hugging Face cache {cache}, "
                   f"and the download failed: {reason}") from None
