"""Where the GPU kernels' tests run: on the GPU when there is one, else in Triton's CPU interpreter, which has to
be chosen before kernels.py is imported (Triton reads TRITON_INTERPRET when it decorates a kernel)."""
import importlib.util
import os

import pytest
import torch

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
