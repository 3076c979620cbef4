"""A study whose `--out` (or `--results`) is a Cloud Storage folder (`gs://BUCKET/...`).

The study works in a local folder named after the bucket path (`working_folder`): its data
subsets, run workdirs and checkpoints stay there, so an interrupted study resumes on the same
machine. The bucket gets what is kept:
- each run's result as soon as it is finished (`ResultStore(mirror=...)` calls `put`): one
  object written in one request, so a result is in the bucket whole or not at all;
- at the end, the report (`upload_report`): results.md and the plots first, results.json
  last, so a report whose upload was cut short has no new results.json.
A study started again, on this machine or another, first copies the bucket's results into
its local results folder (`sync`), so no finished run is computed again.
"""

import hashlib
import pathlib

from im_jax import paths, write_faults


def working_folder(uri: str) -> pathlib.Path:
  """The local folder a study with `--out URI` works in (under the gs:// cache)."""
  uri = uri.rstrip("/")
  digest = hashlib.blake2b(uri.encode(), digest_size=8).hexdigest()
  return paths.cache_root() / "study" / f"{digest}-{uri.rsplit('/', 1)[-1]}"


def sync(local: pathlib.Path, uri: str) -> None:
  """Results in the bucket and not here are copied here; results here and not in the bucket
  (their upload failed last time) are uploaded. Each file and object is written whole."""
  remote = paths.path(uri)
  there = {p.name: p for p in remote.glob("*.json")} if remote.exists() else {}
  here = {p.name: p for p in local.glob("*.json")} if local.is_dir() else {}
  for name in sorted(set(there) - set(here)):
    local.mkdir(parents=True, exist_ok=True)
    write_faults.replace_text(local / name, there[name].read_text(encoding="utf-8"))
  for name in sorted(set(here) - set(there)):
    put(f"{uri}/{name}", here[name].read_text(encoding="utf-8"))


def put(uri: str, text: str) -> None:
  """One object, written whole; a failure is one line that says the local copy is kept."""
  try:
    paths.write_text(uri, text)
  except Exception as e:  # noqa: BLE001 - gcsfs raises its own HTTP errors
    raise paths.CloudError(f"cannot upload {uri}: {' '.join(str(e).split())[:200]}; the "
                           "local copy is kept and the next start uploads it") from None


def upload_report(written: list[pathlib.Path], local_out: pathlib.Path, uri: str) -> list[str]:
  """Uploads the report files under `uri` (results.json last); their gs:// names."""
  uploaded = []
  for file in sorted(written, key=lambda p: p.name == "results.json"):  # a stable sort
    target = f"{uri.rstrip('/')}/{file.relative_to(local_out).as_posix()}"
    try:
      paths.upload_tree(file, target)
    except Exception as e:  # noqa: BLE001
      raise paths.CloudError(f"cannot upload {target}: {' '.join(str(e).split())[:200]}; the "
                             f"report is complete in {local_out}: rerun to upload it") from None
    uploaded.append(target)
  return uploaded
