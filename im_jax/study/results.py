"""The results folder: one JSON file per finished run or evaluation, safe to commit.

A file is written once, atomically, when its work is complete; a study that finds it skips
that work (on this machine or a fresh one with the committed folder). A file is tied to the
settings that produced it (`key`): one made with other settings is never reused or replaced,
the study stops and names it.
"""

import json
import pathlib
from typing import Any

from im_jax import write_faults


class StaleResult(ValueError):
  """A result file made with other settings; the message is one line."""


def key_differences(stored: dict[str, Any], key: dict[str, Any]) -> list[str]:
  """Each top-level field where a stored result's key and `key` differ, with both values
  (shortened): "FIELD: stored X, now Y" ("absent" where one lacks the field)."""
  key = json.loads(json.dumps(key))  # as stored: tuples become lists

  def show(k: dict[str, Any], field: str) -> str:
    text = json.dumps(k[field]) if field in k else "absent"
    return text if len(text) <= 80 else text[:77] + "..."

  return [f"{field}: stored {show(stored, field)}, now {show(key, field)}"
          for field in sorted(set(stored) | set(key))
          if stored.get(field, ...) != key.get(field, ...)]


class ResultStore:
  """`folder` holds the results; with `mirror` (a gs:// folder: `study.bucket`) each result
  is also uploaded when it is put, and the two are synced when the store opens."""

  def __init__(self, folder: pathlib.Path, mirror: str | None = None):
    self.folder = pathlib.Path(folder)
    self.mirror = mirror
    if mirror:
      from im_jax.study import bucket  # pylint: disable=g-import-not-at-top

      bucket.sync(self.folder, mirror)

  def path(self, name: str) -> pathlib.Path:
    return self.folder / f"{name}.json"

  def get(self, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
    """The stored result for `key`, None when there is none; StaleResult when another key's."""
    path = self.path(name)
    if not path.exists():
      return None
    record = json.loads(path.read_text(encoding="utf-8"))
    differences = key_differences(record.get("key") or {}, key)
    if differences:
      raise StaleResult(f"{path} was made with other settings (a different plan or scale; "
                        f"{'; '.join(differences)}): move it away or use another results "
                        "folder")
    return record

  def put(self, name: str, key: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    record = {"key": key, **value}
    path = self.path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1, ensure_ascii=False) + "\n"
    # whole or not at all: a full disk leaves no half-written result (nor its .partial)
    write_faults.replace_text(path, text)
    if self.mirror:  # one object, written whole
      from im_jax.study import bucket  # pylint: disable=g-import-not-at-top

      bucket.put(f"{self.mirror.rstrip('/')}/{path.name}", text)
    return json.loads(json.dumps(record))

  def all(self) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8"))
            for p in sorted(self.folder.glob("*.json"))}
