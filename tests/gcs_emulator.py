"""A local stand-in for Google Cloud Storage (gcp-storage-emulator's JSON API, in memory, on a
free loopback port) and the environment that points the run's two GCS clients at it: gcsfs (epath's
gs:// backend) and TensorStore (Orbax's array writer). Nothing reaches the network: both use
no credentials, and the metadata server both would probe for them is an unused loopback port."""

from __future__ import annotations

import contextlib
import functools
import http.server
import logging
import re
import sys
import threading
import urllib.parse

BUCKET = "bucket"
_MEDIA = re.compile(r"^(?:/download)?/storage/v1/b/(?P<bucket>[^/]+)/o/(?P<object>[^?]+)")


def environment(url: str) -> dict[str, str]:
    """The variables that send gs:// to the emulator at `url`, anonymously."""
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs (and google-cloud-storage)
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup (fsspec reads FSSPEC_<PROTOCOL>_<ARG>)
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no bucket-type lookup through Google's gRPC API
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: a fixed token instead of a lookup
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_ROOT": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
    }


class _Server(http.server.ThreadingHTTPServer):
    """The emulator's request handler behind a server that accepts bursts of connections
    (TensorStore opens dozens at once; the emulator's own server queues 5 and refuses the rest)
    and answers one request at a time (its in-memory store is not meant for threads)."""

    request_queue_size = 256
    daemon_threads = True

    def __init__(self, storage):
        from gcp_storage_emulator.server import RequestHandler

        lock = threading.Lock()

        class Handler(RequestHandler):
            def handle_one_request(self):
                with lock:
                    super().handle_one_request()

            def end_headers(self):
                """An object's bytes come with its generation, as GCS sends them (TensorStore
                reads it; the emulator leaves it out)."""
                m = _MEDIA.match(self.path)
                if self.command == "GET" and m and "alt=media" in self.path:
                    with contextlib.suppress(Exception):  # not found: the emulator answers 404
                        obj = self.storage.get_file_obj(m["bucket"], urllib.parse.unquote(m["object"]))
                        self.send_header("x-goog-generation", obj["generation"])
                        self.send_header("x-goog-metageneration", obj["metageneration"])
                super().end_headers()

        super().__init__(("127.0.0.1", 0), functools.partial(Handler, storage))

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up early
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve():
    """Yields the emulator's URL, with bucket BUCKET created, while it runs."""
    from gcp_storage_emulator.handlers import buckets
    from gcp_storage_emulator.storage import Storage

    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # it logs each missing object
    storage = Storage(use_memory_fs=True)
    buckets.create_bucket(BUCKET, storage)
    httpd = _Server(storage)
    thread = threading.Thread(target=httpd.serve_forever, name="gcs-emulator", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
