"""
The few helpers every script shares: logging to stderr, choosing the device, writing files atomically, saving
image grids as PNG, and the command-line conventions.

Every script spells its options with underscores and lists each with its default in --help; --device is auto
(the GPU when there is one), cpu, cuda or cuda:N, and --compile (and sample.py's --fast) auto, on or off, auto
meaning on a GPU; --ckpt names a checkpoint a script reads; --out is where it writes (a folder for train, sample,
probe and pipeline; the token files' prefix for quantize; the converted file for convert).
"""
import argparse
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


# ---- the command-line conventions ----

SWITCH = ("auto", "on", "off")  # the choices of --compile and --fast: auto means on a GPU


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the script's docstring as written and every option's default."""


def argument_parser(doc):
    """The parser every script starts from: its docstring above the options, each option with its default."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def add_device_options(parser, compile_what=None):
    """--device, and --compile when the script can torch.compile something (compile_what says what)."""
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    if compile_what:
        parser.add_argument("--compile", default="auto", choices=SWITCH,
                            help=f"torch.compile {compile_what} (auto: on a GPU)")


def resolve_device(name):
    """A --device value as a torch.device; a GPU that is not there, or a name that is no device, is a ValueError
    that says what to pass instead."""
    if name == "auto":
        return torch.device(default_device())
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: PyTorch sees no GPU here; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} GPU(s), cuda:0 and up")
    return device


def switch(value, device):
    """An auto/on/off choice as a bool: auto is on for a GPU."""
    if value not in SWITCH:
        raise ValueError(f"{value!r} is not one of {', '.join(SWITCH)}")
    return value == "on" or (value == "auto" and torch.device(device).type == "cuda")


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


def grid_image(images, pad=2, scale=1):
    """uint8 images [rows, cols, H, W, 3] (or [N, H, W, 3], one row) -> one uint8 picture [height, width, 3], white
    between and around them, each pixel drawn `scale` times as wide and high."""
    images = np.asarray(images, np.uint8)
    if images.ndim == 4:
        images = images[None]
    if images.ndim != 5 or images.shape[-1] != 3:
        raise ValueError(f"a grid takes images [rows, cols, H, W, 3], got {list(images.shape)}")
    images = images.repeat(scale, 2).repeat(scale, 3)
    rows, cols, h, w, _ = images.shape
    tiles = np.pad(images, ((0, 0), (0, 0), (0, pad), (0, pad), (0, 0)), constant_values=255)
    grid = tiles.transpose(0, 2, 1, 3, 4).reshape(rows * (h + pad), cols * (w + pad), 3)
    return np.pad(grid, ((pad, 0), (pad, 0), (0, 0)), constant_values=255)


def save_grid(images, path, pad=2, scale=1):
    """grid_image(images, pad, scale) written atomically as a PNG."""
    grid = grid_image(images, pad, scale)
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
