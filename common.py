"""
The helpers every script shares: notes and progress lines on stderr (a script's results, and train.py's step lines,
which are its results as it goes, on stdout), choosing the device and the CPU threads, writing files atomically,
files that verify themselves (checksums inside torch.save's zip), .npy files read without pickles (load_npy),
image grids as PNG, and the command-line conventions.

Every script spells its options with underscores and lists each with its default in --help; --device is auto (the
GPU when there is one), cpu, cuda or cuda:N, and --compile (and the generating scripts' --fast) auto, on or off,
auto meaning on a GPU; --ckpt names a checkpoint a script reads; --out is where it writes (a folder for train,
sample, probe and pipeline; the token files' prefix for quantize; the converted file for convert).

A mistake with a flag or a file ends in one line on stderr and a non-zero exit, never a traceback: argparse's
errors (status 2) print no usage block, and each script's main, wrapped by @script, turns the library's errors
(USER_ERRORS: ValueError, OSError, KeyError, ImportError) and its own SystemExit messages into `script.py: message`
(status 1), and Ctrl-C into `script.py: interrupted` (status 130).
"""
import argparse
import functools
import json
import mmap
import os
import signal
import socket
import sys
import tempfile
import time
import warnings
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image


def log(msg, end="\n"):
    """Progress and notes go to stderr, so stdout holds only a script's results."""
    print(msg, end=end, file=sys.stderr, flush=True)


class Progress:
    """A line of progress on stderr: on a terminal rewritten in place at every call; into a file or pipe (a log)
    written as whole lines, at most one each `every` seconds and always the last, so a log stays readable."""

    def __init__(self, every=10.0):
        self.tty, self.every, self.shown = sys.stderr.isatty(), every, None

    def __call__(self, msg, last=False):
        if self.tty:
            log("\r" + msg + "\033[K", end="\n" if last else "")
        elif last or self.shown is None or time.time() - self.shown >= self.every:
            log(msg)
            self.shown = time.time()


def default_device():
    """Where work runs when --device is auto: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- the command-line conventions ----

SWITCH = ("auto", "on", "off")  # the choices of --compile and --fast: auto means on a GPU


USER_ERRORS = (ValueError, OSError, KeyError, ImportError)  # what the library raises for a wrong flag or file


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the script's docstring as written and every option's default."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line that points to --help instead of the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def argument_parser(doc):
    """The parser every script starts from: its docstring above the options, each option with its default."""
    return ArgumentParser(description=doc, formatter_class=HelpFormatter)


def script(main):
    """Wrap a script's main(argv) so that a user's mistake ends in one line: the library's USER_ERRORS and the
    script's own SystemExit messages become SystemExit("script.py: message") (exit status 1), Ctrl-C
    "script.py: interrupted" (status 130). A script run by another (pipeline.py) adds its name in front. The
    handlers of SIGINT and SIGTERM are left as they were found."""
    name = os.path.basename(sys.modules[main.__module__].__file__)

    @functools.wraps(main)
    def run(argv=None):
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return main(argv)
        except SystemExit as e:
            if isinstance(e.code, str):
                raise SystemExit(f"{name}: {e.code}") from None
            raise
        except USER_ERRORS as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) adds quotes
            raise SystemExit(f"{name}: " + " ".join(str(message).split())) from None
        except KeyboardInterrupt:
            log(f"{name}: interrupted")
            raise SystemExit(130) from None
        finally:  # train.py's stop on a signal has handlers of its own
            for s, handler in handlers.items():
                signal.signal(s, handler)
    return run


def add_device_options(parser, compile_what=None):
    """--device and --threads, and --compile when the script can torch.compile something (compile_what says what)."""
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=0,
                        help="PyTorch's CPU threads (0: $OMP_NUM_THREADS if set, else one per idle core)")
    if compile_what:
        parser.add_argument("--compile", default="auto", choices=SWITCH,
                            help=f"torch.compile {compile_what} (auto: on a GPU)")


def add_generation_options(parser):
    """The options of the scripts that generate (sample.py, demo.py): add_device_options with --compile for the
    one-token step, --dtype of the weights and cache, and --fast for the engine's fused step."""
    add_device_options(parser, compile_what="the one-token step")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="weights and cache on a GPU (the CPU runs float32)")
    parser.add_argument("--fast", default="auto", choices=SWITCH, help="the fused decode step of engine.py (auto: on "
                        "a GPU, for widths and palettes in multiples of 16; off: the plain igpt.generate)")


def generation_dtype(name, device):
    """The torch dtype a --dtype of add_generation_options means on device: float32 on the CPU whatever it says."""
    return torch.bfloat16 if torch.device(device).type == "cuda" and name == "bfloat16" else torch.float32


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


def generation_fast(name):
    """The Engine(fast=...) a --fast of add_generation_options means: "auto", True or False."""
    return {"auto": "auto", "on": True, "off": False}[name]


def set_threads(n, processes=1):
    """Set PyTorch's CPU threads to n; for 0, leave $OMP_NUM_THREADS's choice if it is set, else take one for each
    idle core (idle_cores), shared among `processes` (at least one). Threads beyond the idle cores spin waiting for
    each other, which on a busy machine makes small models many times slower."""
    if n < 0:
        raise ValueError(f"--threads {n}: give a number of threads, or 0 to have it chosen")
    if n == 0 and "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    torch.set_num_threads(n or max(1, round(idle_cores() / processes)))
    return torch.get_num_threads()


def idle_cores(interval=0.1):
    """How many of the cores this process may use are idle now: their number times the idle share of the machine's
    CPU time over the next `interval` seconds (/proc/stat). Where there is no /proc/stat, the cores less the
    1-minute load average, which lags: a job that just ended still counts."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        before = cpu_times()
        time.sleep(interval)
        spent = [b - a for a, b in zip(before, cpu_times())]
    except OSError:
        return cores - os.getloadavg()[0]
    total = sum(spent)
    return cores * (spent[3] + spent[4]) / total if total > 0 else cores  # fields 3 and 4: idle and I/O wait


def cpu_times(path="/proc/stat"):
    """The machine's CPU time so far in clock ticks, by kind: user, nice, system, idle, iowait, irq, softirq, steal
    (the first line of /proc/stat)."""
    with open(path) as f:
        fields = f.readline().split()
    return [int(v) for v in fields[1:9]]


def switch(value, device):
    """An auto/on/off choice as a bool: auto is on for a GPU."""
    if value not in SWITCH:
        raise ValueError(f"{value!r} is not one of {', '.join(SWITCH)}")
    return value == "on" or (value == "auto" and torch.device(device).type == "cuda")


def write_json(path, obj):
    """obj as indented JSON at path, written atomically (atomic_write)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def atomic_write(path, write):
    """write(file) into a temp file beside `path` (folders made as needed), flushed to disk, then renamed over
    `path`: an interrupted write never leaves a half-written file in place of a good one. The file gets the
    user's usual permissions (those of the umask), and temp files of `path` that a killed write left behind are
    removed first."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f".tmp-{os.path.basename(path)}.{socket.gethostname()}."
    _remove_stale(folder, prefix)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{prefix}{os.getpid()}.")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes its file private (0600)
        os.close(fd)
        with open(tmp, "wb") as f:  # by name: f.name serves a writer that takes a path (safetensors' save_file)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _remove_stale(folder, prefix):
    """Remove the temp files named prefix + PID + ... whose writer, a process of this host, no longer runs; a
    live writer's (or another host's, on a shared disk) are left alone."""
    for name in os.listdir(folder):
        pid = name[len(prefix):].split(".")[0]
        if name.startswith(prefix) and pid.isdigit() and not _running(int(pid)):
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:  # another process removed it first
                pass


def _running(pid):
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it does, and is another user's
        pass
    return True


# ---- .npy files ----

def save_npy(path, array):
    """np.save, atomically: the file is whole or not there."""
    atomic_write(path, lambda f: np.save(f, array))


def load_npy(path, fix="write it again with quantize.py", archive=False, **kwargs):
    """The array of a .npy file (kwargs go to np.load: mmap_mode, say), or with archive the arrays of a .npz as a
    dict, read without unpickling. A file that cannot be read so (pickled Python objects, cut short, another kind
    of file) or holds other than numbers is a one-line ValueError naming it and saying `fix`, the way to mend it."""
    def refuse(why):
        return ValueError(f"{path} is not a plain numeric {'.npz' if archive else '.npy'} ({why}): {fix}")

    try:
        loaded = np.load(path, allow_pickle=False, **kwargs)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:  # a .npz's arrays are read when asked for: all of them now, so their errors land here
                loaded = {name: loaded[name] for name in loaded.files}
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        # not numpy's own words, which would suggest allow_pickle=True: that lets the file run code
        pickled = "pickle" in str(e) or "objects" in str(e)
        raise refuse("it holds pickled Python objects, or is not numpy's format" if pickled else
                     f"it is cut short or damaged: {e}") from None
    if isinstance(loaded, dict) != archive:
        raise refuse("it is a .npy file, one array" if archive else "it is a zip archive (a .npz, or a checkpoint?)")
    odd = [a.dtype for a in (loaded.values() if archive else [loaded]) if a.dtype.kind not in "biuf"]
    if odd:
        raise refuse(f"it holds {odd[0]}, not numbers")
    return loaded


# ---- checksums ----

def named_tensors(obj, prefix=""):
    """(path, tensor) for every tensor in nested dicts, lists and tuples, e.g. ("optimizer/state/0/exp_avg", t); of
    a sharded tensor (FSDP's DTensor) this process's shard."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj.to_local() if hasattr(obj, "to_local") else obj
    elif isinstance(obj, (dict, list, tuple)):
        for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            yield from named_tensors(v, f"{prefix}/{k}" if prefix else str(k))


def first_nonfinite(obj):
    """The path of the first floating-point tensor in obj (as named_tensors walks it) holding inf or nan, or None."""
    for name, t in named_tensors(obj):  # min and max are finite only when every value is: one pass, no copy
        if t.is_floating_point() and t.numel() and not torch.isfinite(torch.stack(torch.aminmax(t))).all():
            return name
    return None


def tensor_crc32(t):
    """crc32 of a tensor's bytes."""
    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def file_crc32(path, size=None):
    """crc32 of a file's first `size` bytes (all of them by default), read through a memory map (no copies)."""
    if (os.path.getsize(path) if size is None else size) == 0:
        return 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
        with view[:size] as part:
            return zlib.crc32(part)


class Crc32Writer:
    """A file that keeps the crc32 of everything written through it, in order."""

    def __init__(self, f):
        self.f, self.crc = f, 0

    def write(self, data):
        self.crc = zlib.crc32(data, self.crc)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


# ---- files that verify themselves: torch.save's zip with every tensor's crc32 inside and the file's outside ----
# The crc32 of each tensor's bytes, stored beside them as "checksums", names a tensor that changed; the crc32 of the
# whole file, in the comment of torch's zip (FILE_CRC, then 8 hex digits), catches a change anywhere else: the
# structure, the names, the zip's own records. Loading checks the file's crc32, and looks for the tensor to name only
# when it fails.
FILE_CRC = b"igpt-crc32:"


def save_verified(path, obj):
    """torch.save(obj) (a dict) to path atomically, with obj["checksums"] added and the file's crc32 in the zip's
    comment, for load_verified."""
    obj = {**obj, "checksums": {name: tensor_crc32(t) for name, t in named_tensors(obj)}}

    def write(f):
        crc = Crc32Writer(f)
        torch.save(obj, crc)
        comment = FILE_CRC + b"%08x" % crc.crc
        f.seek(-2, os.SEEK_END)  # the zip ends with the length of its comment, empty as torch writes it
        f.write(len(comment).to_bytes(2, "little") + comment)
    atomic_write(path, write)


def load_verified(path, map_location="cpu"):
    """What save_verified wrote to path, loaded with weights_only=True, or None when torch cannot read it as such
    (another kind of file, or objects beyond tensors and plain values). A file whose crc32 no longer matches is a
    ValueError naming the tensor or part that changed; a file without checksums (written before they were kept)
    loads with a note."""
    intact = _file_crc32_matches(path)
    try:
        with warnings.catch_warnings():  # a damaged file can make torch warn before it fails
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # torch's own message would suggest loading the file unsafely
        obj = None
    if intact is False:
        raise ValueError(f"{path!r} is corrupt: {_changed_part(obj)} changed since it was written (its crc32 does "
                         "not match); use another copy")
    if intact is None and isinstance(obj, dict) and "checksums" in obj:
        raise ValueError(f"{path!r} is corrupt: its zip comment, which records the file's crc32, is damaged")
    if intact is None and isinstance(obj, dict):
        log(f"note: {path} has no checksums (an earlier version wrote it), so it could not be verified")
    return obj


def _file_crc32_matches(path):
    """Whether the file's zip comment holds the crc32 of the file as torch wrote it (that is, with an empty
    comment); None when it has no such comment."""
    n, size = len(FILE_CRC) + 8, os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - n - 2))
        tail = f.read()
    if tail[:2] != n.to_bytes(2, "little") or tail[2:-8] != FILE_CRC:
        return None
    return tail[-8:] == b"%08x" % zlib.crc32(b"\0\0", file_crc32(path, size - n - 2))


def _changed_part(obj):
    """What no longer matches in a file that fails its crc32: a tensor, or what lies around them."""
    if not isinstance(obj, dict):
        return "its structure (torch can no longer read it)"
    checksums = obj.get("checksums") if isinstance(obj.get("checksums"), dict) else {}
    for name, t in named_tensors(obj):
        if checksums.get(name) != tensor_crc32(t):
            return f"tensor {name}"
    return "a part outside the tensors' bytes (the config, the names or the zip's records)"


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
