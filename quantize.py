"""
Images to iGPT token files: read a dataset, fit (or load) the k-means colour palette, write the tokens.

iGPT sees an image as n_px*n_px palette indices in raster order. A pixel is scaled to [-1, 1] as x/127.5 - 1 and
mapped to the nearest of k colour centres (the original release's kmeans_centers.npy is float32 [512, 3] in
[-1, 1] and works here unchanged); a token decodes to rint(127.5*(c + 1)) as uint8, as in the original.

    python quantize.py shapes --test shapes --num_images 5000 --out data/shapes          # the built-in dataset
    python quantize.py data/cifar10-jpeg.zip:train --test data/cifar10-jpeg.zip:test --out data/cifar10
    python quantize.py cifar10:train --test cifar10:test --download data --out data/cifar10
    python quantize.py photos/ --out data/photos --palette kmeans_centers.npy --unlabelled

It writes {out}_trX.npy (uint16 [N, n_px*n_px]) and {out}_trY.npy (int64 labels), {out}_vaX/_vaY (a seeded
--val_frac of the training images held out), {out}_teX/_teY (from --test), {out}_palette.npy and a preview,
{out}_preview.png (originals beside their quantized versions): the original release's naming, so train.py and
probe.py read ours and the original's alike (load_tokens). When the palette is fitted, it is fitted on the
training split only.

A SOURCE is PATH[:SPLIT], SPLIT naming a part of it:
  - a folder with one sub-folder per class (labels from the sorted folder names), or of images without classes;
  - the same inside a .zip; data.zip:train reads the zip's train/ folder;
  - CIFAR-10/100's python pickles: a cifar-10-batches-py or cifar-100-python folder, or the words cifar10 and
    cifar100 for that folder under --download (fetched there first when missing); SPLIT is train or test;
  - downsampled ImageNet .npz batches (`data` [N, 3*n*n] channel-first, `labels` 1-based);
  - a uint8 .npy [N, H, W, 3] (no labels), or a single image file;
  - `shapes`: the built-in procedural dataset (make_shapes), --num_images of them (a fifth as many for
    shapes:test, drawn with seed+1).
Several training SOURCEs are concatenated.

Every image becomes RGB n_px x n_px by to_rgb: 16-bit greyscale scaled to 8 bits, transparency composited onto
white, the centre square cropped, then averaged down to n_px over boxes (enlarged bicubically when smaller).

The palette is k-means in PyTorch, on the GPU when there is one: greedy k-means++ seeding on a random sample of pixels,
then Lloyd iterations over the distinct colours weighted by their counts (exactly k-means over every pixel, but
natural images have several times fewer distinct colours than pixels), in memory-bounded chunks, with integer
sums so the result is the same for a seed on any run of the same device.
"""
import argparse
import contextlib
import hashlib
import io
import math
import multiprocessing
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
import torch
from PIL import Image, ImageOps

from common import atomic_write, default_device, log

CIFAR = {  # name: (official archive, its md5, the folder it unpacks to)
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 "cifar-100-python"),
}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross", "plus", "stripes_h", "stripes_v", "checker")
SPLITS = ("tr", "va", "te")


# ---- the palette: k-means, encode, decode ----

@contextlib.contextmanager
def _full_precision_matmul():
    """TF32 (if another module switched it on) would misorder near-equal distances; the matmuls here are tiny."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _pixel_codes(images, device):
    """uint8 pixels [..., 3] as 24-bit colour codes (r<<16 | g<<8 | b), int32 [P] on the device."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 2 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB pixels [..., 3], got {images.dtype} {list(images.shape)}")
    px = torch.from_numpy(np.ascontiguousarray(images).reshape(-1, 3)).to(device).int()
    return (px[:, 0] << 16) | (px[:, 1] << 8) | px[:, 2]


def _distinct(codes):
    """The distinct colour codes and how many pixels have each; a bincount over all 2^24 colours is O(P)."""
    counts = torch.bincount(codes, minlength=1 << 24)
    colours = counts.nonzero().squeeze(1)
    return colours, counts[colours]


def _rgb(codes):
    """24-bit codes back to integer RGB [n, 3] (int64)."""
    codes = codes.long()
    return torch.stack([codes >> 16, (codes >> 8) & 255, codes & 255], 1)


def _unit(rgb):
    """Integer RGB to the [-1, 1] pixel space the palette lives in."""
    return rgb.float() / 127.5 - 1


def _nearest(x, centres):
    """Nearest centre of each row of x and the squared distance to it, via ||x||^2 - 2x.c + ||c||^2, in chunks of
    a bounded number of distances (larger on a GPU, cache-sized on the CPU)."""
    rows = max(1, (1 << 26 if x.is_cuda else 1 << 20) // len(centres))
    c2 = (centres * centres).sum(1)
    labels = torch.empty(len(x), dtype=torch.long, device=x.device)
    dist = torch.empty(len(x), device=x.device)
    for i in range(0, len(x), rows):
        xi = x[i:i + rows]
        d, labels[i:i + rows] = torch.addmm(c2, xi, centres.T, alpha=-2).min(1)
        dist[i:i + rows] = (d + (xi * xi).sum(1)).clamp_(min=0)
    return labels, dist


def _kmeans_pp(sample, k, gen):
    """Greedy k-means++ seeding: of a few candidates drawn with probability proportional to their squared distance
    from the nearest centre so far, the one that lowers the total the most becomes the next centre. When the
    sample runs out of new colours, the remaining centres are random points of the cube (distinct; Lloyd's
    re-seeding moves them onto data if any is left unserved)."""
    centres = torch.empty(k, 3, device=sample.device)
    centres[0] = sample[torch.randint(len(sample), (1,), generator=gen, device=sample.device)[0]]
    d = ((sample - centres[0]) ** 2).sum(1)
    trials = 2 + int(math.log(k))
    for j in range(1, k):
        if d.sum() <= 0:
            centres[j:] = torch.rand(k - j, 3, generator=gen, device=sample.device) * 2 - 1
            break
        candidates = sample[torch.multinomial(d, trials, replacement=True, generator=gen)]
        d_new = torch.minimum(d, ((sample - candidates[:, None]) ** 2).sum(2))
        best = d_new.sum(1).argmin()
        centres[j], d = candidates[best], d_new[best]
    return centres


@_full_precision_matmul()
def fit_palette(images_or_pixels, k=512, iters=100, seed=0, device=None, progress=True, init=None, tol=1e-4,
                sample_size=32768):
    """k-means colour palette of uint8 RGB images [..., 3] (or pixels [P, 3]): float32 [k, 3] in [-1, 1], the
    layout of the original kmeans_centers.npy. Greedy k-means++ seeds from `sample_size` random pixels (or `init`, a
    [k, 3] palette to start from), then up to `iters` Lloyd steps over the distinct colours weighted by their
    counts; it stops early once no centre moves more than `tol`. Empty clusters are re-seeded on the colours
    farthest from the centres. Deterministic for a seed on a given device."""
    device = torch.device(device or default_device())
    codes = _pixel_codes(images_or_pixels, device)
    if len(codes) == 0:
        raise ValueError("fit_palette needs at least one pixel")
    gen = torch.Generator(device=device).manual_seed(seed)
    if init is None:
        sample = codes[torch.randint(len(codes), (sample_size,), generator=gen, device=device)]
        centres = _kmeans_pp(_unit(_rgb(sample)), k, gen)
    else:
        centres = torch.as_tensor(np.asarray(init, dtype=np.float32), device=device).clone()
        if centres.shape != (k, 3):
            raise ValueError(f"init must be [k, 3] = [{k}, 3], got {list(centres.shape)}")
    colours, counts = _distinct(codes)
    del codes
    rgb = _rgb(colours)
    x, weighted = _unit(rgb), rgb * counts[:, None]  # sums of integer RGB are exact, so any summation order agrees
    for it in range(iters):
        labels, dist = _nearest(x, centres)
        n = torch.zeros(k, dtype=torch.long, device=device).index_add_(0, labels, counts)
        sums = torch.zeros(k, 3, dtype=torch.long, device=device).index_add_(0, labels, weighted)
        new = (sums.double() / n[:, None].clamp(min=1) / 127.5 - 1).float()
        empty = n == 0
        new[empty] = centres[empty]
        if empty.any():
            _reseed(new, empty, x, dist)
        moved = (new - centres).abs().max().item()
        centres = new
        if progress and (it % 10 == 0 or moved < tol or it == iters - 1):
            mse = (dist.double() * counts).sum().item() / counts.sum().item()
            log(f"kmeans: step {it + 1}/{iters}, mse per pixel {mse:.6f}, largest move {moved:.2e}, "
                f"{int(empty.sum())} empty")
        if moved < tol:
            break
    return centres.cpu().numpy()


def _reseed(centres, empty, x, dist):
    """Move each empty centre in turn onto the colour farthest from every centre so far (farthest first, so the
    new centres spread out); where no colour is off its centre (fewer colours than centres), they stay put."""
    dist = dist.clone()
    for i in empty.nonzero().squeeze(1).tolist():
        far = dist.argmax()  # the first of equals, so ties go the same way every run
        if dist[far] <= 0:
            break
        centres[i] = x[far]
        dist = torch.minimum(dist, ((x - centres[i]) ** 2).sum(1))


@_full_precision_matmul()
def palette_mse(images, palette, device=None):
    """Mean squared distance from each pixel to its nearest palette colour, in [-1, 1] units summed over RGB
    (the k-means objective per pixel)."""
    device = torch.device(device or default_device())
    colours, counts = _distinct(_pixel_codes(images, device))
    _, dist = _nearest(_unit(_rgb(colours)), torch.as_tensor(np.asarray(palette, np.float32), device=device))
    return (dist.double() * counts).sum().item() / max(1, counts.sum().item())


@_full_precision_matmul()
def encode(images, palette, device=None):
    """uint8 images [N, H, W, 3] -> uint16 tokens [N, H*W] in raster order: the nearest palette colour of each
    pixel. Each distinct colour is looked up once, then a 2^24-entry table maps every pixel."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"encode expects images [N, H, W, 3], got shape {list(images.shape)}")
    palette = np.asarray(palette, np.float32)
    if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) > 65536:
        raise ValueError(f"a palette is [k, 3] with k <= 65536 (uint16 tokens), got {list(palette.shape)}")
    device = torch.device(device or default_device())
    codes = _pixel_codes(images, device)
    colours, _ = _distinct(codes)
    labels, _ = _nearest(_unit(_rgb(colours)), torch.as_tensor(palette, device=device))
    table = torch.zeros(1 << 24, dtype=torch.int32, device=device)
    table[colours] = labels.int()
    return table[codes].cpu().numpy().astype(np.uint16).reshape(len(images), -1)


def decode(tokens, palette):
    """Tokens [N, n_px*n_px] -> uint8 images [N, n_px, n_px, 3]: each colour is rint(127.5*(c + 1)) computed in
    float32, as the original does."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or math.isqrt(tokens.shape[1]) ** 2 != tokens.shape[1]:
        raise ValueError(f"decode expects tokens [N, n_px*n_px], got shape {list(tokens.shape)}")
    n_px = math.isqrt(tokens.shape[1])
    colours = np.clip(np.rint(127.5 * (np.asarray(palette, np.float32) + np.float32(1))), 0, 255).astype(np.uint8)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= len(colours)):
        raise ValueError(f"tokens must lie in 0..{len(colours) - 1} for this palette of {len(colours)} colours")
    return colours[tokens].reshape(len(tokens), n_px, n_px, 3)


def load_palette(path):
    """A palette .npy (ours or the original kmeans_centers.npy) as float32 [k, 3] in [-1, 1]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no palette file {path!r}")
    try:
        palette = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path!r} is not a .npy palette ({e})") from e
    if palette.ndim != 2 or palette.shape[1] != 3 or not np.issubdtype(palette.dtype, np.floating):
        raise ValueError(f"{path!r}: a palette is float [k, 3], got {palette.dtype} {list(palette.shape)}")
    if not np.isfinite(palette).all() or np.abs(palette).max(initial=0) > 1 + 1e-6:
        raise ValueError(f"{path!r}: palette colours must lie in [-1, 1] (pixel/127.5 - 1)")
    return palette.astype(np.float32)


def find_palette(prefix):
    """The palette for token files `prefix`: {prefix}_palette.npy, else kmeans_centers.npy beside them, else None."""
    for path in (f"{prefix}_palette.npy", os.path.join(os.path.dirname(prefix), "kmeans_centers.npy")):
        if os.path.isfile(path):
            return path
    return None


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
        images, bad, done = [], [], 0
        for chunk, failed in (pool.imap(_read_files, tasks) if pool else map(_read_files, tasks)):
            images.append(chunk)
            bad += failed
            done += len(chunk)
            if progress:
                log(f"\rreading images: {done}/{len(names)}", end="" if done < len(names) else "\n")
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
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        images.append(data)
        labels.append(_checked_labels(batch[key], len(data), path))
    labels = np.concatenate(labels)
    classes = [str(i) for i in range(labels.max() + 1)]
    if os.path.isfile(os.path.join(folder, meta)):
        with open(os.path.join(folder, meta), "rb") as f:
            classes = [c.decode() for c in pickle.load(f, encoding="bytes")[names_key]]
    return _resized(np.concatenate(images), n_px), labels, classes


def _read_npz(path, n_px):
    """Downsampled ImageNet: `data` [N, 3*n*n] uint8 channel-first, `labels` 1-based; class names are those ids."""
    with np.load(path) as z:
        if "data" not in z.files:
            raise ValueError(f"{path}: expected the downsampled-ImageNet keys 'data' and 'labels', got {z.files}")
        data, labels = z["data"], z["labels"] if "labels" in z.files else None
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
    images = np.load(path, mmap_mode="r")
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
        return _read_folder(os.path.join(path, split), n_px, workers, progress)
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
        done, t0, shown = start, time.time(), 0.0
        with open(part, "ab" if start else "wb") as f:
            try:
                while block := response.read(chunk):
                    f.write(block)
                    done += len(block)
                    if progress and (time.time() - shown > 0.5 or done == total):
                        shown = time.time()
                        rate = (done - start) / 1e6 / max(shown - t0, 1e-9)
                        of = f"/{total / 1e6:.1f}" if total else ""
                        log(f"\r{os.path.basename(path)}: {done / 1e6:.1f}{of} MB, {rate:.1f} MB/s", end="")
            except OSError as e:
                raise OSError(f"download of {url} broke off at byte {done} ({e}); run again to resume") from e
    if progress:
        log("")
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
    if os.path.isfile(archive) and _md5(archive) != md5:
        os.remove(archive)  # a bad copy from before: fetch it again
    fetch(url, archive, progress=progress)
    got = _md5(archive)
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
    """The built-in dataset: n images of one of 10 shapes (SHAPES) in a random colour on a random background, at
    a random position and size (stripes and checkers: random period and phase over the whole image), rendered
    with 4x4 supersampling for smooth edges. Classes are balanced. Returns (uint8 [n, n_px, n_px, 3], int64
    labels [n], class names); the same seed gives the same images."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPES))
    cx, cy = rng.uniform(0.3, 0.7, (2, n))
    r = rng.uniform(0.2, 0.38, n)
    period, phase = rng.uniform(0.1, 0.25, n), rng.uniform(0, 1, n)
    bg, fg = rng.integers(0, 256, (2, n, 3))
    close = np.linalg.norm(fg - bg, axis=1) < 120  # keep every shape visible against its background
    fg[close] = (bg[close] + 128) % 256
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
        alpha = cover.reshape(len(b), n_px, s, n_px, s).mean((2, 4))[..., None]
        images[b] = np.rint(bg[b, None, None] + alpha * (fg[b, None, None] - bg[b, None, None])).astype(np.uint8)
    return images, labels.astype(np.int64), list(SHAPES)


# ---- token files and pictures ----

def save_npy(path, array):
    atomic_write(path, lambda f: np.save(f, array))


def load_tokens(prefix, split):
    """Token files {prefix}_{split}X.npy (memory-mapped, integer [N, n_px*n_px]) and {prefix}_{split}Y.npy if it
    exists (one-hot or integer labels -> int64 [N], else None); split is tr, va or te. Ours and the original
    release's alike."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    x_path, y_path = f"{prefix}_{split}X.npy", f"{prefix}_{split}Y.npy"
    if not os.path.isfile(x_path):
        raise FileNotFoundError(f"no token file {x_path!r}; make it with: python quantize.py SOURCE --out {prefix}"
                                + (" --test TEST_SOURCE" if split == "te" else ""))
    x = np.load(x_path, mmap_mode="r")
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{x_path}: tokens must be integers [N, n_px*n_px], got {x.dtype} {list(x.shape)}")
    if not os.path.isfile(y_path):
        return x, None
    y = np.load(y_path)
    if y.ndim == 2:  # one-hot, as in the original release
        y = y.argmax(1)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.array_equal(y, np.round(y))):
        raise ValueError(f"{y_path}: labels must be integers [N] or one-hot [N, classes], got {y.dtype} "
                         f"{list(y.shape)}")
    if len(y) != len(x):
        raise ValueError(f"{y_path} has {len(y)} labels but {x_path} has {len(x)} images")
    return x, y.astype(np.int64)


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


# ---- the command line ----

def holdout(n, frac, seed):
    """The seeded validation hold-out of n training images: (train indices, val indices), each sorted, with
    round(frac * n) in val."""
    perm = np.random.default_rng(seed).permutation(n)
    n_va = round(frac * n)
    return np.sort(perm[n_va:]), np.sort(perm[:n_va])


def read_sources(specs, args, test=False):
    """Concatenate the images of several sources; `shapes` and cifar10/cifar100 are resolved here."""
    parts = []
    for spec in specs:
        name, _, split = spec.partition(":")
        if name == "shapes" and not os.path.exists(name):
            is_test = (split or ("test" if test else "train")) == "test"
            n = args.num_images // 5 if is_test else args.num_images
            parts.append(make_shapes(n, args.n_px, args.seed + is_test))
        elif name in CIFAR and not os.path.exists(name):
            folder = os.path.join(args.download or "data", CIFAR[name][2])
            if not os.path.isdir(folder):
                if not args.download:
                    raise SystemExit(f"{folder} not found: pass --download DIR to fetch the official archive")
                folder = download_cifar(name, args.download)
            parts.append(load_images(f"{folder}:{split or ('test' if test else 'train')}", args.n_px,
                                     args.workers))
        else:
            parts.append(load_images(spec, args.n_px, args.workers))
    labelled = [p[1] is not None for p in parts]
    if any(labelled) and not all(labelled):
        raise SystemExit(f"some of {specs} have labels and some do not")
    classes = max((p[2] for p in parts), key=len)
    if any(p[2] != classes[:len(p[2])] for p in parts):
        raise SystemExit(f"the sources {specs} have different classes")
    images = np.concatenate([p[0] for p in parts])
    return images, np.concatenate([p[1] for p in parts]) if all(labelled) else None, classes


def parse_args(argv=None):
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("source", nargs="+", help="training images: SOURCE[:SPLIT] (see above); several are joined")
    p.add_argument("--out", required=True, default=argparse.SUPPRESS,
                   help="prefix of the files written: OUT_trX.npy, ..., e.g. data/cifar10")
    p.add_argument("--test", nargs="+", default=[], metavar="SOURCE",
                   help="test images (OUT_teX/teY), e.g. data.zip:test")
    p.add_argument("--palette", default="", help="a palette .npy to use, e.g. the original kmeans_centers.npy "
                                                 "('': fit one on the training split)")
    p.add_argument("--k", type=int, default=512, help="palette size when fitting")
    p.add_argument("--iters", type=int, default=100, help="most k-means steps (it stops early once settled)")
    p.add_argument("--n_px", type=int, default=32, help="images become n_px x n_px")
    p.add_argument("--val_frac", type=float, default=0.1, help="fraction of the training images held out as val")
    p.add_argument("--seed", type=int, default=0, help="seeds the hold-out, the k-means and `shapes`")
    p.add_argument("--num_images", type=int, default=50000, help="images of `shapes` (shapes:test: a fifth)")
    p.add_argument("--download", default="", metavar="DIR",
                   help="for cifar10/cifar100: fetch the official archive into DIR unless its folder is there "
                        "already ('': use the folder under data/, no download)")
    p.add_argument("--unlabelled", action="store_true", help="accept sources without labels (writes no Y files)")
    p.add_argument("--workers", type=int, default=0, help="processes decoding image files (0: one per CPU)")
    p.add_argument("--device", default="auto", help="k-means and encoding device: auto, cpu, cuda, cuda:N")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    args = p.parse_args(argv)
    if not 0 <= args.val_frac < 1:
        p.error("--val_frac must lie in [0, 1)")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = default_device() if args.device == "auto" else args.device
    out = {f"{s}{xy}": f"{args.out}_{s}{xy}.npy" for s in SPLITS for xy in "XY"}
    out |= {"palette": f"{args.out}_palette.npy", "preview": f"{args.out}_preview.png"}
    existing = [p for p in out.values() if os.path.exists(p)]
    if existing and not args.force:
        raise SystemExit(f"refusing to overwrite {', '.join(existing)}: pass --force, or choose another --out")
    times = {}

    t0 = time.perf_counter()
    try:
        images, labels, classes = read_sources(args.source, args)
        test = read_sources(args.test, args, test=True) if args.test else None
    except (FileNotFoundError, ValueError) as e:  # a missing or unreadable source: its message, no traceback
        raise SystemExit(f"quantize.py: {e}") from e
    if not args.unlabelled and (labels is None or (test and test[1] is None)):
        raise SystemExit("a source has no labels (class folders, CIFAR or ImageNet files have them): "
                         "pass --unlabelled to write tokens without labels")
    if test and test[1] is not None and test[2] != classes:  # same class names, same numbers
        index = {c: i for i, c in enumerate(classes)}
        missing = sorted(set(test[2]) - set(index))
        if missing:
            raise SystemExit(f"test classes {missing} are not among the training classes")
        test = test[0], np.array([index[c] for c in test[2]], np.int64)[test[1]], classes
    kept, held = holdout(len(images), args.val_frac, args.seed)
    if len(kept) == 0:
        raise SystemExit(f"{len(images)} training images leave none to train on after the hold-out")
    splits = {"tr": (images[kept], None if labels is None else labels[kept]),
              "va": (images[held], None if labels is None else labels[held])}
    if test:
        splits["te"] = test[:2]
    times["read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if args.palette:
        palette = load_palette(args.palette)
    else:
        log(f"fitting {args.k} colours on {len(splits['tr'][0])} training images on {device}")
        palette = fit_palette(splits["tr"][0], args.k, args.iters, args.seed, device)
    times["palette"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokens = {s: encode(x, palette, device) for s, (x, _) in splits.items()}
    mse = palette_mse(splits["tr"][0], palette, device)
    times["encode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    written = []
    for s, (x, y) in splits.items():
        save_npy(out[f"{s}X"], tokens[s])
        written.append(out[f"{s}X"])
        if y is not None:
            save_npy(out[f"{s}Y"], y.astype(np.int64))
            written.append(out[f"{s}Y"])
    save_npy(out["palette"], palette)
    x = splits["tr"][0]
    pick = np.random.default_rng(args.seed).choice(len(x), min(32, len(x)), replace=False)
    cols = min(8, len(pick))
    pairs = np.full((math.ceil(len(pick) / cols) * cols, 2, args.n_px, args.n_px, 3), 255, np.uint8)
    pairs[:len(pick), 0], pairs[:len(pick), 1] = x[pick], decode(tokens["tr"][pick], palette)
    save_grid(pairs.reshape(-1, 2 * cols, args.n_px, args.n_px, 3), out["preview"], scale=max(1, 64 // args.n_px))
    written += [out["palette"], out["preview"]]
    for p in set(out.values()) - set(written):  # with --force, leave no file of an earlier run behind
        if os.path.exists(p):
            os.remove(p)
    times["write"] = time.perf_counter() - t0

    counts = ", ".join(f"{s} {len(x)}" for s, (x, _) in splits.items())
    print(f"images ({args.n_px}x{args.n_px}): {counts}")
    print(f"classes: {len(classes)}" + (f" ({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''})"
                                        if classes else " (unlabelled)"))
    print(f"palette: {len(palette)} colours, " + (f"from {args.palette}" if args.palette else "fitted on tr")
          + f"; mse per pixel on tr {mse:.6f} (rms {127.5 * math.sqrt(mse / 3):.2f} of 255 per channel)")
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    print(f"wrote {', '.join(written)}")
    return {"images": {s: len(x) for s, (x, _) in splits.items()}, "classes": classes, "palette_mse": mse,
            "seconds": times}


if __name__ == "__main__":
    main(sys.argv[1:])
