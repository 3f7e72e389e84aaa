"""
The few helpers every script shares: logging to stderr, choosing the device, writing files atomically,
saving image grids as PNG.
"""
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image


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


def save_grid(images, path, pad=2, scale=1):
    """uint8 images [rows, cols, H, W, 3] (or [N, H, W, 3], one row) -> one PNG, white between and around them,
    each pixel drawn `scale` times as wide and high."""
    images = np.asarray(images, np.uint8)
    if images.ndim == 4:
        images = images[None]
    if images.ndim != 5 or images.shape[-1] != 3:
        raise ValueError(f"save_grid expects images [rows, cols, H, W, 3], got {list(images.shape)}")
    images = images.repeat(scale, 2).repeat(scale, 3)
    rows, cols, h, w, _ = images.shape
    tiles = np.pad(images, ((0, 0), (0, 0), (0, pad), (0, pad), (0, 0)), constant_values=255)
    grid = tiles.transpose(0, 2, 1, 3, 4).reshape(rows * (h + pad), cols * (w + pad), 3)
    grid = np.pad(grid, ((pad, 0), (pad, 0), (0, 0)), constant_values=255)
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
