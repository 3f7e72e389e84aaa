"""
The few helpers every script shares: logging to stderr, choosing the device, writing files atomically.
"""
import os
import sys
import tempfile

import torch


def log(msg, end="\n"):
    """Progress and notes go to stderr, so stdout holds only a script's results."""
    print(msg, end=end, file=sys.stderr, flush=True)


def default_device():
    """Where work runs when --device is auto: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def atomic_write(path, write):
    """write(file) into a temp file beside `path` (folders made as needed), flushed to disk, then renamed over
    `path`: an interrupted write never leaves a half-written file in place of a good one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
