"""Fixtures shared by several test files."""
import functools
import hashlib
import http.server
import tarfile
import threading

import pytest

from fake_cifar import write_cifar10


@pytest.fixture
def cifar_server(tmp_path):
    """A local HTTP server holding a tiny cifar-10-python.tar.gz in the official layout; yields (url, md5)."""
    write_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", "cifar-10-batches-py")
    md5 = hashlib.md5((served / "cifar-10-python.tar.gz").read_bytes()).hexdigest()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz", md5
    server.shutdown()
    server.server_close()
