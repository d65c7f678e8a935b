"""Local object stores for the tests: a GCS API (gcp-storage-emulator, plus GCS's create-if-absent
precondition) and moto's S3 server, each started in a subprocess by `ObjectStore`.

    python tests/object_store_server.py PORT     # the GCS API alone

gcp-storage-emulator (2026.7) departs from GCS in two ways that matter here, and this launcher
restores GCS's documented behaviour before serving (everything else is the emulator's own):
- it ignores `ifGenerationMatch`; GCS answers 412 Precondition Failed to an upload with
  `ifGenerationMatch=0` when the object exists
  (https://cloud.google.com/storage/docs/request-preconditions). The run-directory lock relies on it.
- its media downloads lack the `x-goog-generation` header, which tensorstore's GCS driver reads.
It also serves one connection at a time, so a client holding a keep-alive connection (gcsfs,
tensorstore and the trainer's processes each hold some) blocks every other: it is served here by
a threading HTTP server, one thread per connection. Its in-memory storage is not safe for
concurrent requests (a resumable upload could lose its upload id), so requests still run one at a
time, under one lock, once their headers have arrived.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from http import HTTPStatus, server as http_server

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _with_precondition(handler, name_of):
    def checked(request, response, storage, *args, **kwargs):
        if request.query.get("ifGenerationMatch", [None])[0] == "0":
            bucket, name = request.params.get("bucket_name"), name_of(request)
            try:
                storage.get_file_obj(bucket, name)
            except NotFound:
                pass
            else:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
        return handler(request, response, storage, *args, **kwargs)
    return checked


def _upload_name(request):
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        return (data.get("meta") or data).get("name")
    return None


def _with_generation_header(handler):
    """Media downloads carry the object's generation in `x-goog-generation`, as GCS sends it
    (tensorstore's reader requires it)."""
    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            obj = None
        if obj is not None:
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return handler(request, response, storage, *args, **kwargs)
    return download


def _serialized(method, lock):
    def handle(self, *args, **kwargs):
        with lock:
            return method(self, *args, **kwargs)
    return handle


def main(port: int) -> None:
    patched = {
        objects.download: _with_generation_header(objects.download),
        objects.insert: _with_precondition(objects.insert, _upload_name),
        objects.xml_upload: _with_precondition(objects.xml_upload, lambda r: r.params.get("object_id")),
    }
    for _, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            methods[method] = patched.get(handler, handler)
    objects.insert = patched[objects.insert]  # also reached by name for POSTs with an upload_id
    objects.download = patched[objects.download]  # and by name from `get` with alt=media
    def serve(thread):
        # Python's default listen backlog (5) makes a burst of concurrent ranged reads wait a second
        # for TCP to retry; a real endpoint takes them all.
        http_server.ThreadingHTTPServer.request_queue_size = 256
        thread._httpd = http_server.ThreadingHTTPServer((thread._host, thread._port), partial(server.RequestHandler, thread._storage))
        thread._httpd.daemon_threads = True
        thread.is_running.set()
        thread._httpd.serve_forever()

    server.APIThread.run = serve
    lock = threading.Lock()
    for name in ("do_GET", "do_POST", "do_PUT", "do_DELETE", "do_PATCH", "do_HEAD"):
        method = getattr(server.RequestHandler, name, None)
        if method is not None:
            setattr(server.RequestHandler, name, _serialized(method, lock))
    srv = server.create_server("127.0.0.1", port, in_memory=True)
    print("ready", flush=True)
    srv.run()


class ObjectStore:
    """A local object-store server in a subprocess (GCS: this module's `main`; S3: moto's server),
    and the environment that points gcsfs, s3fs and tensorstore at it, set while it runs. Used by
    the tests' `gcs` and `s3` fixtures and by benchmarks/data_loader.py --gcs-emulator."""

    def __init__(self, kind: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        if kind == "gs":
            cmd = [sys.executable, __file__, str(port)]
            self.env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                        # gcsfs's gRPC probe for hierarchical-namespace buckets waits a minute offline.
                        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                        # No credentials to look for (fsspec reads FSSPEC_<PROTOCOL>_<ARG> at import).
                        "FSSPEC_GCS_TOKEN": "anon"}
        else:
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
            self.env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
        self.kind, self.url = kind, url
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=1)
                break
            except OSError as e:
                if getattr(e, "code", None):  # an HTTP error: the server answers
                    break
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{kind} test server did not start (exit {self.proc.poll()})") from e
                time.sleep(0.2)
        os.environ.update(self.env)
        if kind == "gs":
            import fsspec

            fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"  # this process imported fsspec already
        self._n = 0

    def bucket(self) -> str:
        """A new empty bucket; returns its URL (gs://NAME or s3://NAME)."""
        import fsspec

        self._n += 1
        name = f"bkt{self._n}-{os.getpid()}"
        fs = fsspec.filesystem(self.kind, **({"token": "anon"} if self.kind == "gs" else {}))
        fs.mkdir(name)
        return f"{self.kind}://{name}"

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        for k in self.env:
            os.environ.pop(k, None)
        if self.kind == "gs":
            import fsspec

            fsspec.config.conf.get("gcs", {}).pop("token", None)


if __name__ == "__main__":
    main(int(sys.argv[1]))
