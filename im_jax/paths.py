"""Paths that are local or in Cloud Storage (`gs://BUCKET/...`): one layer for every command.

Built on `etils.epath`, whose `Path` reaches `gs://` through gcsfs (fsspec), chosen over bare
fsspec because orbax takes and returns `epath.Path`: a bucket workdir goes to the checkpoint
manager as it is and orbax writes arrays straight to the bucket through tensorstore, and
the rest of the code (config.json, metrics, the damaged-checkpoint moves, listing steps)
uses one pathlib-like API for both places. Local paths stay `pathlib.Path`s, so local
behaviour is unchanged. The workdir lock needs
object preconditions (create only if absent, rewrite only one's own generation), which
google-cloud-storage (a gcsfs dependency) exposes directly: `bucket_lock` uses it.

Objects cannot be appended to or renamed atomically, so writers here either write one whole
object (`write_text`), or write locally and upload (`Staging`, `upload_tree`). Readers that
need local files (models, tokenizers, data files) get a copy in a local cache keyed by the
objects' generations (`fetch`): a second start reads no object again, a changed object
gives a new copy. Every problem before any work is one `CloudError` line: gcsfs missing, no
credentials, a bucket that does not exist, no permission to write.

The tests run against fake-gcs-server (`STORAGE_EMULATOR_HOST`, `TENSORSTORE_GCS_HTTP_URL`).
"""

import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import socket
import tempfile
from typing import Any

from etils import epath

from im_jax import write_faults

GS = "gs://"
CACHE_ENV = "IM_JAX_GCS_CACHE"  # where `fetch` keeps local copies (default ~/.cache/im_jax/gcs)
_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_INSTALL = "pip install 'im-jax[gcs]' (gcsfs)"
# In a training workdir these are outputs, never what a loader reads.
_WORKDIR_SKIP = ("damaged_checkpoints/", "hf/", "tensorboard/", "wandb/", "data_plan/")

log = logging.getLogger(__name__)
PathLike = str | os.PathLike


class CloudError(ValueError):
  """A Cloud Storage path that cannot be used; the message is one line for the user."""


def is_remote(spec: Any) -> bool:
  return str(spec).removeprefix("hf:").startswith(GS)


def path(spec: PathLike) -> pathlib.Path | epath.Path:
  """A `pathlib.Path` for a local path (so local behaviour is plain pathlib's), an
  `epath.Path` for a `gs://` URI (then gcsfs must be installed); both share the API."""
  if not is_remote(spec):
    return pathlib.Path(spec)
  client()  # gcsfs and google-cloud-storage importable, credentials found
  return epath.Path(spec)


def split(uri: PathLike) -> tuple[str, str]:
  """(bucket, object name or prefix) of `gs://BUCKET/NAME`."""
  bucket, _, name = str(uri).removeprefix(GS).partition("/")
  return bucket, name.rstrip("/")


@functools.lru_cache(maxsize=1)
def client():
  """The google-cloud-storage client (the emulator's when STORAGE_EMULATOR_HOST is set)."""
  try:
    import gcsfs  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CloudError(f"gs:// paths need gcsfs ({e.name} is not installed): {_INSTALL}") from None
  logging.getLogger("gcsfs").setLevel(logging.ERROR)  # one warning per call about bucket types
  logging.getLogger("fsspec").setLevel(logging.WARNING)  # a line per file opened
  import fsspec  # pylint: disable=g-import-not-at-top

  for protocol in ("gs", "gcs"):  # other processes write the same folders: list them afresh
    fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False
  if os.environ.get(_EMULATOR_ENV):  # a local emulator (the tests)
    from gcsfs import core  # pylint: disable=g-import-not-at-top

    for protocol in ("gs", "gcs"):
      # No credentials to find (gcsfs would probe for Google's), and gcsfs's plain JSON-API
      # class: its newer default also asks a gRPC control API, which emulators lack.
      fsspec.config.conf.setdefault(protocol, {})["token"] = "anon"
      fsspec.register_implementation(protocol, core.GCSFileSystem, clobber=True)
    return storage.Client.create_anonymous_client()
  import google.auth  # pylint: disable=g-import-not-at-top
  from google.auth import exceptions as auth_errors  # pylint: disable=g-import-not-at-top

  try:
    credentials, project = google.auth.default()
  except auth_errors.DefaultCredentialsError as e:
    raise CloudError("gs:// paths need Google Cloud credentials and none were found ("
                     f"{' '.join(str(e).split())[:160]}): run `gcloud auth application-default "
                     "login`, or use a VM whose service account may use the bucket") from None
  return storage.Client(project=project, credentials=credentials)


def _fs():
  """gcsfs through fsspec's registry, so the emulator settings of `client` apply."""
  import fsspec  # pylint: disable=g-import-not-at-top

  client()
  return fsspec.filesystem("gs")


def api_errors():
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

  return exceptions


def check_ready(spec: PathLike, *, what: str, write: bool = False) -> None:
  """Before any work: the bucket exists and is readable (and writable: a probe object is
  written and deleted). A no-op for local paths."""
  if not is_remote(spec):
    return
  uri = str(spec).removeprefix("hf:")
  bucket_name, prefix = split(uri)
  errors = api_errors()
  bucket = client().bucket(bucket_name)
  try:  # listing needs only object permissions (bucket metadata may be out of reach)
    next(iter(bucket.list_blobs(prefix=prefix, max_results=1)), None)
  except errors.NotFound:
    raise CloudError(f"{what}={spec}: bucket gs://{bucket_name} does not exist") from None
  except errors.Forbidden:
    raise CloudError(f"{what}={spec}: no permission to read gs://{bucket_name}") from None
  except errors.GoogleAPIError as e:
    raise CloudError(f"{what}={spec}: cannot reach gs://{bucket_name}: {_short(e)}") from None
  if not write:
    return
  probe = bucket.blob(f"{prefix}/.im_jax_write_probe.{socket.gethostname()}.{os.getpid()}"
                      .lstrip("/"))
  try:
    probe.upload_from_string(b"")
    probe.delete()
  except errors.Forbidden:
    raise CloudError(f"{what}={spec}: no permission to write to gs://{bucket_name}") from None
  except errors.GoogleAPIError as e:
    raise CloudError(f"{what}={spec}: cannot write to gs://{bucket_name}: {_short(e)}") from None


def _short(e: Exception) -> str:
  return " ".join(str(e).split())[:200]


def write_text(target: PathLike, text: str) -> None:
  """Replaces a file whole: a local one through a temporary sibling and a rename; an object
  is written in one request, which is atomic in Cloud Storage."""
  if is_remote(target):
    path(target).write_text(text)
    return
  write_faults.replace_text(target, text)


def _objects(uri: str) -> dict[str, dict[str, Any]]:
  """Relative name -> object info (size, generation) of the object `uri` or under it."""
  fs = _fs()
  bucket, name = split(uri)
  root = f"{bucket}/{name}".rstrip("/")
  found = fs.find(root, detail=True)
  if list(found) == [root]:  # a single object
    return {"": found[root]}
  return {key[len(root) + 1:]: info for key, info in found.items()
          if key.startswith(root + "/") and not key.endswith("/")}


def _workdir_selection(objects: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Of a training workdir, what loaders read: the newest complete checkpoint (its commit
  file written), config.json and tokenizer/; other steps and the outputs stay behind."""
  steps = {int(n.split("/")[1]) for n in objects
           if n.startswith("checkpoints/") and n.split("/")[1].isdigit()
           and n.endswith("/commit_success.txt") and n.count("/") == 2}
  if not steps:
    return {n: i for n, i in objects.items() if not n.startswith(_WORKDIR_SKIP)}
  keep = f"checkpoints/{max(steps)}/"
  return {n: i for n, i in objects.items()
          if n.startswith(keep) or not n.startswith(("checkpoints/", *_WORKDIR_SKIP))}


def cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get(CACHE_ENV) or
                      pathlib.Path.home() / ".cache" / "im_jax" / "gcs")


def fetch(spec: PathLike, *, what: str) -> str:
  """A local path for `spec`: local specs as they are; a `gs://` object or folder (`hf:`
  kept) copied once into the cache, keyed by its objects' names and generations.

  A training workdir is copied in part (`_workdir_selection`). The copy is made under a
  temporary name and renamed when complete, so a killed copy is never used.
  """
  text = str(spec)
  if not is_remote(text):
    return text
  prefix = "hf:" if text.startswith("hf:") else ""
  uri = text.removeprefix(prefix).rstrip("/")
  check_ready(uri, what=what)
  objects = _objects(uri)
  if not objects:
    raise CloudError(f"{what}={spec}: no such object or folder")
  if "" not in objects and any(n.startswith("checkpoints/") for n in objects):
    objects = _workdir_selection(objects)
  listing = sorted((n, str(i.get("generation")), int(i.get("size") or 0))
                   for n, i in objects.items())
  key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:20]
  local = cache_root() / key / uri.rsplit("/", 1)[-1]
  if local.exists():
    return prefix + str(local)
  local.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".partial-", dir=local.parent))
  fs, (bucket, name) = _fs(), split(uri)
  try:
    for rel, info in objects.items():
      target = tmp / local.name / rel if rel else tmp / local.name
      target.parent.mkdir(parents=True, exist_ok=True)
      fs.get_file(f"{bucket}/{name}/{rel}".rstrip("/"), str(target),
                  generation=info.get("generation"))  # the listed version, not a newer one
    try:
      os.replace(tmp / local.name, local)
    except OSError:  # another process (a host's other trainer) made the same copy first
      if not local.exists():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  log.info("copied %s (%d objects) to %s", uri, len(objects), local)
  return prefix + str(local)


def upload_tree(local: PathLike, uri: PathLike, *, last: str | None = None) -> None:
  """Copies a local file or folder to `uri` (objects replaced one by one). `last` names the
  file uploaded after all others: the one a reader checks (config.json of a HF folder), so a
  cut-short upload does not look complete."""
  fs, (bucket, name) = _fs(), split(uri)
  local = pathlib.Path(local)
  if local.is_file():
    fs.put_file(str(local), f"{bucket}/{name}")
    return
  files = sorted(p for p in local.rglob("*") if p.is_file())
  files.sort(key=lambda p: p.relative_to(local).as_posix() == last)
  for file in files:
    fs.put_file(str(file), f"{bucket}/{name}/{file.relative_to(local).as_posix()}")


def move(source: PathLike, target: PathLike) -> None:
  """Renames a file or folder; in a bucket every object is copied, then deleted (no folder
  needs to exist first: a bucket has none)."""
  if not is_remote(source):
    pathlib.Path(source).rename(target)
    return
  fs = _fs()
  fs.mv("/".join(split(source)), "/".join(split(target)), recursive=True)


def remove_tree(uri: PathLike) -> None:
  """Deletes every object under `uri` (the caller checked it may)."""
  target = path(uri)
  if target.exists():
    target.rmtree()


class Staging:
  """Files written locally and uploaded to a remote folder on `push` (objects cannot be
  appended to). `pull` first copies an existing remote file, so a resumed run continues it.
  Local folders need none of this: `local` is the folder itself and `push` does nothing."""

  def __init__(self, folder: PathLike, *, skip: tuple[str, ...] = ()):
    self.remote = str(folder) if is_remote(folder) else None
    self._skip = skip  # relative names (prefixes) never uploaded
    if self.remote is None:
      self.local = pathlib.Path(folder)
      return
    client()
    self.local = pathlib.Path(tempfile.mkdtemp(prefix="im_jax_staging_"))
    self._pushed: dict[str, tuple[int, int]] = {}

  def pull(self, name: str) -> None:
    if self.remote is None:
      return
    source = path(f"{self.remote}/{name}")
    if source.exists():
      (self.local / name).parent.mkdir(parents=True, exist_ok=True)
      (self.local / name).write_bytes(source.read_bytes())
      self._pushed[name] = self._signature(self.local / name)

  @staticmethod
  def _signature(file: pathlib.Path) -> tuple[int, int]:
    stat = file.stat()
    return stat.st_size, stat.st_mtime_ns

  def push(self) -> None:
    """Uploads every file changed since the last push."""
    if self.remote is None:
      return
    for file in sorted(p for p in self.local.rglob("*") if p.is_file()):
      rel = file.relative_to(self.local).as_posix()
      if rel.startswith(self._skip):
        continue
      signature = self._signature(file)
      if self._pushed.get(rel) != signature:
        upload_tree(file, f"{self.remote}/{rel}")
        self._pushed[rel] = signature

  def close(self) -> None:
    if self.remote is not None:
      self.push()
      shutil.rmtree(self.local, ignore_errors=True)
