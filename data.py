"""
Reading the data: every kind of image dataset, the CIFAR download, the built-in shapes dataset, and the token files
in the original release's naming.

load_images(SOURCE, n_px) returns (uint8 images [N, n_px, n_px, 3], int64 labels [N] or None when unlabelled,
class names). A SOURCE is PATH[:SPLIT], SPLIT naming a part of it:
  - a folder with one sub-folder per class (labels from the sorted folder names), or of images without classes;
  - the same inside a .zip; data.zip:train reads the zip's train/ folder;
  - CIFAR-10/100's python pickles: a cifar-10-batches-py or cifar-100-python folder (download_cifar fetches the
    official archive and checks its md5); SPLIT is train or test;
  - downsampled ImageNet .npz batches (`data` [N, 3*n*n] channel-first, `labels` 1-based);
  - a uint8 .npy [N, H, W, 3] (no labels), or a single image file.
make_shapes draws the built-in procedural dataset instead: ten shapes (SHAPES), balanced, with no download.

Every image becomes RGB n_px x n_px by to_rgb: 16-bit greyscale scaled to 8 bits, transparency composited onto
white, the centre square cropped, then averaged down to n_px over boxes (enlarged bicubically when smaller).

Token files are the original release's: {prefix}_{split}X.npy holds the tokens (integer [N, n_px*n_px]; ours are
uint16) and {prefix}_{split}Y.npy the labels (one-hot in the original, int64 in ours), for split tr, va or te
(SPLITS), e.g. cifar10_trX.npy. load_tokens reads ours and the original's alike; holdout draws the seeded
validation split that va holds. quantize.py writes its files as a set, {prefix}_manifest.json last (begin_set,
finish_set): it names every file of the set with its size and crc32, and readers check the files they read against
it (check_set), so they never mix the files of two runs, one of them cut short.

No data file can run code: .npy and .npz files are read without pickles (load_npy, which refuses a file holding
pickled objects, cut short or of anything but numbers in one line naming it), CIFAR's pickles by an unpickler that
admits only what the official files hold, and a zip member is refused before decompression when it declares more
than MAX_MEMBER_BYTES.
"""
import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
from PIL import Image, ImageOps

from common import Progress, atomic_write, file_crc32, load_npy, log
from palette import find_palette, load_palette

CIFAR = {  # name: (official archive, its md5, the folder it unpacks to)
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 "cifar-100-python"),
}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross", "plus", "stripes_h", "stripes_v", "checker")
SPLITS = ("tr", "va", "te")
SPLIT_FOLDERS = {"train", "test", "val", "valid", "validation"}  # names of splits, not of classes
MAX_MEMBER_BYTES = 1 << 28  # a zip member declaring more is no image (a 1 MB zip can declare gigabytes)
SHAPE_COLOURS = {"black": (0, 0, 0), "red": (220, 40, 40), "yellow": (250, 205, 40), "blue": (50, 110, 235)}


# ---- images: any mode and size to RGB n_px x n_px; the dataset readers ----

def to_rgb(image, n_px):
    """Any PIL image -> uint8 [n_px, n_px, 3]. 16-bit greyscale (I;16, I) is scaled by 1/257 and rounded;
    transparency (RGBA, LA, P with a transparent colour) is composited onto white, round(a*c + (1 - a)*255);
    other modes are converted by PIL. Then the centre square is cropped (the odd pixel going to the right or the
    bottom) and averaged down to n_px: PIL's reduce() by the whole factor f (each pixel the mean of an f x f
    block), then Image.BOX for a fractional rest. A square smaller than n_px is enlarged bicubically."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = Image.fromarray(np.rint(np.clip(np.asarray(image, np.float64), 0, 65535) / 257).astype(np.uint8))
    if image.has_transparency_data:
        a = np.asarray(image.convert("RGBA"), np.uint32)
        alpha = a[..., 3:]
        image = Image.fromarray(((a[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8))
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(image.resize((n_px, n_px), Image.BOX if s >= n_px else Image.BICUBIC, box=box, reducing_gap=1))


def _read_files(task):
    """Decode a chunk of image files (paths, or members of a zip): (images, ["name (error)" for each failure])."""
    zip_path, names, n_px = task
    out = np.zeros((len(names), n_px, n_px, 3), np.uint8)
    bad = []
    with zipfile.ZipFile(zip_path) if zip_path else contextlib.nullcontext() as zf:
        for i, name in enumerate(names):
            try:
                if zf and (size := zf.getinfo(name).file_size) > MAX_MEMBER_BYTES:  # checked before unpacking
                    raise ValueError(f"it unpacks to {size} bytes, more than "
                                     f"MAX_MEMBER_BYTES = {MAX_MEMBER_BYTES}")
                with Image.open(io.BytesIO(zf.read(name)) if zf else name) as image:
                    out[i] = to_rgb(ImageOps.exif_transpose(image), n_px)
            except Exception as e:
                bad.append(f"{name} ({e})")
    return out, bad


def _decode_files(names, n_px, zip_path=None, workers=None, progress=True):
    """Decode image files into uint8 [N, n_px, n_px, 3], with a pool of processes when there are many. Every file
    that fails is named in one error at the end."""
    workers = workers or os.cpu_count() or 1
    size = max(100, math.ceil(len(names) / (4 * workers)))
    tasks = [(zip_path, names[i:i + size], n_px) for i in range(0, len(names), size)]
    with multiprocessing.Pool(min(workers, len(tasks))) if workers > 1 and len(tasks) > 1 else \
            contextlib.nullcontext() as pool:
        images, bad, done, show = [], [], 0, Progress()
        for chunk, failed in (pool.imap(_read_files, tasks) if pool else map(_read_files, tasks)):
            images.append(chunk)
            bad += failed
            done += len(chunk)
            if progress:
                show(f"reading images: {done}/{len(names)}", last=done == len(names))
    if bad:
        raise ValueError(f"{len(bad)} unreadable image(s) in {zip_path or 'the source'}: "
                         + "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
    return np.concatenate(images) if images else np.zeros((0, n_px, n_px, 3), np.uint8)


def _layout(paths, where):
    """Labels from relative image paths: sorted class names from their first folder, or no labels when every
    image lies at the top. Returns (paths in order, labels or None, class names)."""
    top = sorted(p for p in paths if "/" not in p)
    nested = sorted(p for p in paths if "/" in p)
    if not paths:
        raise ValueError(f"no images found in {where} (looked for {', '.join(IMAGE_EXTS)})")
    if top and nested:
        raise ValueError(f"{where} mixes images at the top ({top[0]!r}) with class folders ({nested[0]!r}): "
                         "put every image in a class folder, or none")
    if top:
        return top, None, []
    classes = sorted({p.split("/")[0] for p in nested})
    if set(classes) <= SPLIT_FOLDERS:
        raise ValueError(f"{where} holds the splits {classes}, not classes: name the split to read, as in "
                         f"quantize.py {where}:train --test {where}:test")
    index = {c: i for i, c in enumerate(classes)}
    return nested, np.array([index[p.split("/")[0]] for p in nested], np.int64), classes


def _is_image(rel):
    parts = rel.split("/")
    return rel.lower().endswith(IMAGE_EXTS) and not any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _read_folder(folder, n_px, workers, progress):
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(root, folder).replace(os.sep, "/")
        paths += [f if rel == "." else f"{rel}/{f}" for f in files if _is_image(f)]
    paths, labels, classes = _layout(paths, folder)
    images = _decode_files([os.path.join(folder, p) for p in paths], n_px, None, workers, progress)
    return images, labels, classes


def _read_zip(path, split, n_px, workers, progress):
    prefix = split.strip("/") + "/" if split else ""
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
    members = [n for n in names if n.startswith(prefix) and _is_image(n)]
    if not members and split:
        tops = sorted({n.split("/")[0] + "/" for n in names if "/" in n and _is_image(n)})
        raise ValueError(f"no images under {prefix!r} in {path}; its top-level folders: {tops}")
    rel, labels, classes = _layout([n[len(prefix):] for n in members], f"{path}:{split}" if split else path)
    images = _decode_files([prefix + r for r in rel], n_px, path, workers, progress)
    return images, labels, classes


def _resized(images, n_px):
    """Arrays of other sizes go through to_rgb, image by image, like files do."""
    if images.shape[1:3] == (n_px, n_px):
        return np.ascontiguousarray(images)
    return np.stack([to_rgb(Image.fromarray(im), n_px) for im in images]) if len(images) else \
        np.zeros((0, n_px, n_px, 3), np.uint8)


def _checked_labels(labels, n, where):
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(labels) != n:
        raise ValueError(f"{where}: {len(labels)} labels for {n} images")
    return labels


class _CifarUnpickler(pickle.Unpickler):
    """The official CIFAR pickles hold dicts, lists, bytes, str, numbers and numpy arrays. Only the three numpy
    names that rebuild an array may be looked up, so a crafted file cannot call anything else."""
    ARRAY = {"_reconstruct": np.ndarray.__reduce__(np.zeros(1))[0], "ndarray": np.ndarray, "dtype": np.dtype}
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR file never holds")
        return self.ARRAY[name]


def _cifar_pickle(path, keys):
    """A CIFAR pickle (a dict holding `keys`), read by the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated, corrupt or crafted: which, the message says
        raise ValueError(f"{path} is not a readable CIFAR file ({e or type(e).__name__}); fetch the official "
                         "archive again (quantize.py cifar10:train --download DIR)") from None
    if not isinstance(batch, dict) or not all(k in batch for k in keys):
        raise ValueError(f"{path} is not a CIFAR file: it lacks {[k.decode() for k in keys]}")
    return batch


def _read_cifar(folder, split, n_px):
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test; fine labels) in the official pickles."""
    c10 = os.path.isfile(os.path.join(folder, "data_batch_1"))
    if split not in ("train", "test"):
        raise ValueError(f"{folder}: a CIFAR split is train or test, not {split!r}")
    files = ([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]) if c10 else [split]
    key, meta, names_key = ((b"labels", "batches.meta", b"label_names") if c10 else
                            (b"fine_labels", "meta", b"fine_label_names"))
    images, labels = [], []
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: not a complete CIFAR folder")
        batch = _cifar_pickle(path, (b"data", key))
        data = np.asarray(batch[b"data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: CIFAR data are uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
        data = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        images.append(data)
        labels.append(_checked_labels(batch[key], len(data), path))
    labels = np.concatenate(labels)
    classes = [str(i) for i in range(labels.max() + 1)]
    if os.path.isfile(os.path.join(folder, meta)):
        classes = [c.decode() for c in _cifar_pickle(os.path.join(folder, meta), (names_key,))[names_key]]
    return _resized(np.concatenate(images), n_px), labels, classes


def _read_npz(path, n_px):
    """Downsampled ImageNet: `data` [N, 3*n*n] uint8 channel-first, `labels` 1-based; class names are those ids."""
    z = load_npy(path, fix="fetch the downsampled-ImageNet batch again", archive=True)
    if "data" not in z:
        raise ValueError(f"{path}: expected the downsampled-ImageNet keys 'data' and 'labels', got {list(z)}")
    data, labels = z["data"], z.get("labels")
    n = math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0
    if data.dtype != np.uint8 or 3 * n * n != (data.shape[1] if data.ndim == 2 else -1):
        raise ValueError(f"{path}: 'data' must be uint8 [N, 3*n*n], got {data.dtype} {list(data.shape)}")
    images = _resized(data.reshape(-1, 3, n, n).transpose(0, 2, 3, 1), n_px)
    if labels is None:
        return images, None, []
    labels = _checked_labels(labels, len(images), path) - 1
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{path}: labels must be 1-based, as in the downsampled ImageNet release")
    return images, labels, [str(i + 1) for i in range(labels.max(initial=-1) + 1)]


def _read_npy(path, n_px):
    images = load_npy(path, fix="save the images with np.save, as uint8 [N, H, W, 3]", mmap_mode="r")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: expected uint8 images [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    return _resized(images, n_px), None, []


def split_source(source):
    """'path:split' -> (path, split); the split only where the part before it exists (so C:\\... still works)."""
    path, sep, split = source.rpartition(":")
    return (path, split) if sep and os.path.exists(path) else (source, "")


def load_images(source, n_px=32, workers=None, progress=True):
    """Images of a source (see the module docstring: folder, zip[:split], CIFAR folder[:split], .npz, .npy, or one
    image file) as (uint8 [N, n_px, n_px, 3], int64 labels [N] or None when unlabelled, class names)."""
    path, split = split_source(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {path!r}")
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, f)) for f in ("data_batch_1", "test_batch", "meta")):
            return _read_cifar(path, split or "train", n_px)
        return _read_folder(os.path.join(path, split) if split else path, n_px, workers, progress)
    if path.endswith((".npz", ".npy")) and split:
        raise ValueError(f"{source!r}: a :split applies to a folder or a .zip, not to a {path[-4:]} file")
    if path.endswith(".npz"):
        return _read_npz(path, n_px)
    if path.endswith(".npy"):
        return _read_npy(path, n_px)
    if zipfile.is_zipfile(path):
        return _read_zip(path, split, n_px, workers, progress)
    if split:
        raise ValueError(f"{source!r}: a :split applies to a folder or a .zip, not to an image file")
    return _decode_files([path], n_px, progress=False), None, []


# ---- downloads ----

def fetch(url, path, chunk=1 << 20, progress=True):
    """Download url to path. A path that exists is taken as complete and skipped; the bytes arrive in path + '.part'
    (renamed when complete), and a '.part' left by an interrupted run is resumed with an HTTP Range request.
    progress: print the MB and MB/s as they arrive."""
    if os.path.exists(path):
        log(f"{path} is already here")
        return path
    part = path + ".part"
    start = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and e.headers.get("Content-Range", "").endswith(f"/{start}"):  # the .part is complete
            os.replace(part, path)
            return path
        raise OSError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise OSError(f"could not download {url}: {e.reason}") from e
    with response:
        if response.status != 206:
            start = 0  # the server sent the whole file
        size = response.headers.get("Content-Length")
        total = start + int(size) if size is not None else None
        done, t0, shown, show = start, time.time(), 0.0, Progress()

        def report(last=False):
            rate = (done - start) / 1e6 / max(time.time() - t0, 1e-9)
            of = f"/{total / 1e6:.1f}" if total else ""
            to_go = f", {(total - done) / 1e6 / rate:.0f}s to go" if total and rate > 0 and not last else ""
            show(f"{os.path.basename(path)}: {done / 1e6:.1f}{of} MB, {rate:.1f} MB/s{to_go}", last)

        with open(part, "ab" if start else "wb") as f:
            try:
                while block := response.read(chunk):
                    f.write(block)
                    done += len(block)
                    if progress and time.time() - shown > 0.5:
                        shown = time.time()
                        report()
            except OSError as e:
                raise OSError(f"download of {url} broke off at byte {done} ({e}); run again to resume") from e
        if progress:
            report(last=True)
    if total is not None and done != total:
        raise OSError(f"download of {url} stopped at byte {done} of {total}; run again to resume")
    os.replace(part, path)
    return path


def download_cifar(name, root, url=None, md5=None, progress=True):
    """Fetch the official CIFAR archive into root (unless a good copy is there), check its md5, unpack it, and
    return the pickle folder. url and md5 override the official ones (for a mirror)."""
    default_url, default_md5, folder = CIFAR[name]
    url, md5 = url or default_url, md5 or default_md5
    target = os.path.join(root, folder)
    if os.path.isdir(target):
        return target
    os.makedirs(root, exist_ok=True)
    archive = os.path.join(root, url.rsplit("/", 1)[-1])
    got = _md5(archive) if os.path.isfile(archive) else None
    if got not in (None, md5):
        os.remove(archive)  # a bad copy from before: fetch it again
        got = None
    fetch(url, archive, progress=progress)
    got = got or _md5(archive)
    if got != md5:
        os.remove(archive)
        raise ValueError(f"{url}: md5 {got} is not the expected {md5}; the download was corrupt or is not "
                         "the official archive, and was deleted")
    unpacked = tempfile.mkdtemp(dir=root, prefix=".unpack-")  # renamed into place whole, never half-written
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
        if not os.path.isdir(os.path.join(unpacked, folder)):
            raise ValueError(f"{archive} holds no {folder}/ folder")
        os.replace(os.path.join(unpacked, folder), target)
    finally:
        shutil.rmtree(unpacked)
    return target


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---- the built-in dataset ----

def _shape_mask(kind, x, y, cx, cy, r, period, phase):
    """Where shape `kind` covers the points (x, y) of the unit square; all arguments broadcast [B, S, S]."""
    u, v = (x - cx) / r, (y - cy) / r
    au, av = np.abs(u), np.abs(v)
    if kind == "circle":
        return u * u + v * v <= 1
    if kind == "square":
        return np.maximum(au, av) <= 0.8
    if kind == "triangle":  # apex up
        return (v <= 0.7) & (au <= (v + 0.9) * 0.55)
    if kind == "diamond":
        return au + av <= 1
    if kind == "ring":
        return (u * u + v * v <= 1) & (u * u + v * v >= 0.36)
    if kind == "cross":
        return ((np.abs(u - v) <= 0.3) | (np.abs(u + v) <= 0.3)) & (np.maximum(au, av) <= 0.85)
    if kind == "plus":
        return ((au <= 0.25) | (av <= 0.25)) & (np.maximum(au, av) <= 0.95)
    if kind == "stripes_h":
        return np.floor(y / period + phase) % 2 == 0
    if kind == "stripes_v":
        return np.floor(x / period + phase) % 2 == 0
    return (np.floor(x / period + phase) + np.floor(y / period + phase)) % 2 == 0  # checker


def make_shapes(n, n_px=32, seed=0):
    """The built-in dataset: n images of 10 kinds (SHAPES), each a shape in one of SHAPE_COLOURS on a background
    of another, near the centre at a random size with a pixel of background all round (stripes and checkers: over
    the whole image, 2 or 3 pixels wide, at any offset). Edges are hard (a pixel takes the shape's colour where the
    shape covers at least half of it, from 4x4 samples), so the images hold only those colours and a palette of
    len(SHAPE_COLOURS) codes them exactly. The labels cycle through the classes: the first 10*m images hold m of
    each, and the first ten show every class. Returns (uint8 [n, n_px, n_px, 3], int64 labels [n], class names);
    the same seed gives the same images."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(SHAPES)
    r = rng.uniform(0.34, 0.42, n)
    edge = np.minimum(r + 1 / n_px, 0.5)  # a pixel of background all round, so the whole shape is in view
    cx, cy = np.clip(0.5 + rng.uniform(-0.06, 0.06, (2, n)), edge, 1 - edge)
    width = rng.integers(2, 4, n)  # stripes and checker squares 2 or 3 pixels wide, starting at any pixel
    period, phase = width / n_px, rng.integers(0, 6, n) / width
    colours = np.array(list(SHAPE_COLOURS.values()))
    # Shape and background take any two different colours, so each pixel is any colour alike whatever the class
    # and every class has the same mean image: a linear classifier on the pixels has little to hold on to.
    bg = rng.integers(0, len(colours), n)
    fg = (bg + rng.integers(1, len(colours), n)) % len(colours)
    s = 4
    g = (np.arange(n_px * s) + 0.5) / (n_px * s)
    images = np.empty((n, n_px, n_px, 3), np.uint8)
    for start in range(0, n, 512):
        b = np.arange(start, min(n, start + 512))
        cover = np.zeros((len(b), n_px * s, n_px * s))
        for j, kind in enumerate(SHAPES):
            m = labels[b] == j
            p = [a[b][m][:, None, None] for a in (cx, cy, r, period, phase)]
            cover[m] = _shape_mask(kind, g[None, None, :], g[None, :, None], *p)
        inside = cover.reshape(len(b), n_px, s, n_px, s).mean((2, 4)) >= 0.5
        images[b] = np.where(inside[..., None], colours[fg[b]][:, None, None], colours[bg[b]][:, None, None])
    return images, labels.astype(np.int64), list(SHAPES)


# ---- token files ----

TOKEN_FILE = re.compile(r"(.*)_(tr|va|te)([XY])\.npy")  # {prefix}_{split}X.npy or ..Y.npy


def check_tokens(X, name, n_vocab, block_size=None):
    """Fail in one line (ValueError) on token images [N, T] a model cannot read: T other than its block_size, or
    values outside its palette of n_vocab colours. name says where they came from."""
    if block_size is not None and (X.ndim != 2 or X.shape[1] != block_size):
        n_px = math.isqrt(block_size)
        raise ValueError(f"{name}: token images of shape {list(X.shape)}, but the model reads [N, {block_size}] "
                         f"({n_px}x{n_px}); quantize the data at n_px={n_px}")
    if X.ndim != 2:
        raise ValueError(f"{name}: token images are [N, n_px*n_px], got shape {list(X.shape)}")
    if len(X):
        lo, hi = int(X.min()), int(X.max())
        if lo < 0 or hi >= n_vocab:
            raise ValueError(f"{name}: token values span {lo}..{hi} but the palette has {n_vocab} colours "
                             f"(0..{n_vocab - 1}); were these files made with another palette?")


def load_tokens(prefix, split):
    """Token files {prefix}_{split}X.npy (memory-mapped, integer [N, n_px*n_px]) and {prefix}_{split}Y.npy if it
    exists (integer labels [N] or [N, 1], or one-hot [N, classes] -> int64 [N], else None); split is tr, va or te.
    Ours and the original release's alike; files of a set quantize.py wrote are checked against its manifest."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if token_file := TOKEN_FILE.fullmatch(os.fspath(prefix)):
        raise ValueError(f"{prefix!r} is a token file; give the prefix of the files instead: {token_file[1]!r}")
    x_path, y_path = f"{prefix}_{split}X.npy", f"{prefix}_{split}Y.npy"
    if not os.path.isfile(x_path):
        inside = sorted(f[:-8] for f in os.listdir(prefix) if f.endswith("_trX.npy")) if os.path.isdir(prefix) else []
        make = f"make it with: python quantize.py SOURCE --out {prefix}" + (" --test SOURCE" if split == "te" else "")
        raise FileNotFoundError(f"no token file {x_path!r}; " + (
            f"the folder {prefix} holds the prefixes {[os.path.join(prefix, p) for p in inside]}" if inside else make))
    check_set(prefix, [p for p in (x_path, y_path) if os.path.isfile(p)])
    x = load_npy(x_path, mmap_mode="r")
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{x_path}: tokens must be integers [N, n_px*n_px], got {x.dtype} {list(x.shape)}")
    if len(x) == 0:
        raise ValueError(f"{x_path} holds no images" + (" (quantize.py --val_frac 0 leaves va empty)" if split == "va"
                                                        else "") + ": use another split, or quantize again")
    if not os.path.isfile(y_path):
        return x, None
    y = load_npy(y_path)
    if y.ndim == 2 and y.shape[1] == 1:  # a column of integer labels
        y = y[:, 0]
    elif y.ndim == 2 and ((y == 0) | (y == 1)).all() and (y.sum(1) == 1).all():  # one-hot, as released
        y = y.argmax(1)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.array_equal(y, np.round(y))):
        raise ValueError(f"{y_path}: labels must be integers [N] or [N, 1], or one-hot [N, classes], got {y.dtype} "
                         f"{list(y.shape)}")
    if len(y) != len(x):
        raise ValueError(f"{y_path} has {len(y)} labels but {x_path} has {len(x)} images")
    return x, y.astype(np.int64)


def tokens_palette(prefix):
    """The palette of the token files `prefix` (palette.find_palette; checked against the set's manifest) as
    (path, float32 [k, 3]), or (None, None) when there is none."""
    path = find_palette(prefix)
    if path is None:
        return None, None
    check_set(prefix, [path])
    return path, load_palette(path)


# ---- sets of files: {prefix}_manifest.json ----

def manifest_path(prefix):
    return f"{prefix}_manifest.json"


def begin_set(prefix):
    """Mark the set `prefix` as being written: readers refuse it until finish_set, so a run cut short never
    leaves old and new files that pass for one set."""
    atomic_write(manifest_path(prefix), lambda f: f.write(b'{"complete": false}\n'))


def finish_set(prefix, paths):
    """Record the set's files, now complete, with their sizes and crc32s."""
    files = {os.path.basename(p): {"bytes": os.path.getsize(p), "crc32": file_crc32(p)} for p in paths}
    text = json.dumps({"complete": True, "files": files}, indent=1) + "\n"
    atomic_write(manifest_path(prefix), lambda f: f.write(text.encode()))


def check_set(prefix, paths):
    """Check files of the set `prefix` ({prefix}_*) against its manifest: each must be listed, with its size and
    crc32. Without a manifest (the original release's files, say) they are read as they are."""
    path = manifest_path(prefix)
    paths = [p for p in paths if os.path.basename(p).startswith(os.path.basename(prefix) + "_")]
    if not paths or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"] if manifest["complete"] else None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is damaged: run quantize.py again (with --force)") from None
    if files is None:
        raise ValueError(f"{path}: the quantize.py run writing these files did not finish; run it again "
                         "(with --force)")
    for p in paths:
        entry = files.get(os.path.basename(p))
        if entry is None:
            raise ValueError(f"{p} is not one of the files {path} lists (left from another run?): run quantize.py "
                             "again (with --force)")
        if os.path.getsize(p) != entry["bytes"] or file_crc32(p) != entry["crc32"]:
            raise ValueError(f"{p} is not the file {path} lists (it changed after quantize.py wrote the set): run "
                             "quantize.py again (with --force)")


def holdout(n, frac, seed):
    """The seeded validation hold-out of n training images: (train indices, val indices), each sorted, with
    round(frac * n) in val."""
    perm = np.random.default_rng(seed).permutation(n)
    n_va = round(frac * n)
    return np.sort(perm[n_va:]), np.sort(perm[:n_va])
