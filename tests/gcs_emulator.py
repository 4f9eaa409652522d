"""A Google Cloud Storage emulator on 127.0.0.1 for tests that put workdirs and data in a bucket.

`gcp-storage-emulator` (the `test` extra) serves the GCS JSON API in memory. The variables that
point the clients at it are the ones the README gives for testing this way:
  STORAGE_EMULATOR_HOST              Google's Python clients and gcsfs (etils.epath, TensorBoard)
  TENSORSTORE_GCS_HTTP_URL           tensorstore's GCS driver (orbax's array storage)
  GOOGLE_AUTH_TOKEN_FOR_TESTING      tensorstore: skip looking for credentials
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT  "false": gcsfs would first probe the bucket over gRPC, which
                                     the emulator does not serve, and wait a minute for it
Subprocesses started after `start` inherit them through os.environ.

The emulator's downloads lack the `x-goog-generation` header real GCS sends with every object
read, which tensorstore's driver needs (orbax's OCDBT manifests: "Malformed StorageGeneration");
the launcher below adds it (and `x-goog-metageneration`) from the object's metadata.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time

# Runs the emulator (argv: port, bucket) with the generation headers added to downloads.
_LAUNCHER = """
import sys, time
from gcp_storage_emulator.handlers import objects

_download = objects.download

def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

objects.download = download  # before the server module builds its routes

from gcp_storage_emulator.server import create_server

server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2])
server.start()
while True:
  time.sleep(1)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(bucket: str, workdir: str):
  """Starts the emulator with `bucket` created; yields "gs://bucket"; restores os.environ after."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(port), bucket], cwd=workdir,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  saved = dict(os.environ)
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="test",
                    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  try:
    deadline = time.time() + 60
    while True:
      assert proc.poll() is None, "gcp-storage-emulator exited at start"
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
      except OSError:
        if time.time() > deadline:
          raise TimeoutError("gcp-storage-emulator did not start in 60 s") from None
        time.sleep(0.2)
    yield f"gs://{bucket}"
  finally:
    proc.terminate()
    proc.wait(timeout=30)
    os.environ.clear()
    os.environ.update(saved)
