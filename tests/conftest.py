"""Fixtures shared by several test files, and where the GPU kernels' tests run: on the GPU when there is one,
else in Triton's CPU interpreter, which has to be chosen before kernels.py is imported (Triton reads
TRITON_INTERPRET when it decorates a kernel). The tests' models are tiny, so they run on one CPU thread each (the
scripts they start too): more threads only wait on each other, the more so on a busy machine."""
import functools
import hashlib
import http.server
import importlib.util
import os
import tarfile
import threading

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before PyTorch is imported, which reads it once

import pytest  # noqa: E402
import torch  # noqa: E402

from fake_cifar import write_cifar10  # noqa: E402

if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def kernel_device():
    """The device the kernels run on in this session: cuda, or cpu in the interpreter, checked once on a small
    attention step; the kernel tests are skipped, with the reason, where neither runs."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("the GPU kernels need Triton, which is not installed")
    import kernels
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not kernels.runs_on(device):
        pytest.skip(f"Triton cannot run the kernels on {device} here (Triton 3.4+ is needed)")
    try:
        q = torch.zeros(1, 1, 16, device=device)
        kernels.decode_attention(q, q, q, torch.zeros(1, 1, 4, 16, device=device),
                                 torch.zeros(1, 1, 4, 16, device=device), torch.tensor([1], device=device))
    except Exception as e:  # e.g. Triton 3.6's interpreter with NumPy 2
        import triton
        pytest.skip(f"Triton {triton.__version__} cannot run the kernels on {device}: {str(e).splitlines()[0]}")
    return device


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
