"""
The colour palette, iGPT's tokenizer: an image becomes n_px*n_px palette indices in raster order.

A pixel is scaled to [-1, 1] as x/127.5 - 1 and mapped to the nearest of k colour centres found by k-means (the
original release's kmeans_centers.npy is float32 [512, 3] in [-1, 1] and works here unchanged); a token decodes to
rint(127.5*(c + 1)) computed in float32, as uint8, as in the original.

    palette = fit_palette(images, k=512)     # uint8 images [N, n_px, n_px, 3] -> float32 [512, 3] in [-1, 1]
    tokens = encode(images, palette)         # -> uint16 [N, n_px*n_px]
    images = decode(tokens, palette)         # -> uint8 [N, n_px, n_px, 3]

The k-means is in PyTorch, on the GPU when there is one: greedy k-means++ seeding on a random sample of pixels,
then Lloyd iterations over the distinct colours weighted by their counts (exactly k-means over every pixel, but
natural images have several times fewer distinct colours than pixels), in memory-bounded chunks, with integer
sums so the result is the same for a seed on any run of the same device.
"""
import contextlib
import math
import os

import numpy as np
import torch

from common import default_device, load_npy, log
from igpt import load_checkpoint


# ---- colour codes, nearest centres, k-means ----

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
    if len(colours) < k:
        log(f"note: the images hold only {len(colours)} distinct colours, so {k - len(colours)} of the {k} palette "
            f"colours stay unused; k={len(colours)} (quantize.py --k {len(colours)}) would lose nothing")
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



# ---- nearest colours: the error, encode, decode ----

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
    return table[codes].cpu().numpy().astype(np.uint16).reshape(len(images), images.shape[1] * images.shape[2])


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


# ---- palette files ----

def load_palette(path):
    """The palette a --palette names, as float32 [k, 3] in [-1, 1]: a .npy (ours or the original
    kmeans_centers.npy), or a checkpoint .pt, whose palette is taken. Anything else, and a checkpoint holding no
    palette, is a one-line ValueError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no palette file {path!r}")
    if os.fspath(path).endswith(".pt"):
        palette = load_checkpoint(path).get("palette")
        if palette is None:
            raise ValueError(f"{path!r} holds no palette: give a checkpoint that has one, or a palette .npy such as "
                             "kmeans_centers.npy")
        palette = np.asarray(palette)
    else:
        palette = load_npy(path, fix="give a palette .npy [k, 3] (such as kmeans_centers.npy) or a checkpoint .pt")
    if palette.ndim != 2 or palette.shape[1] != 3 or not np.issubdtype(palette.dtype, np.floating):
        raise ValueError(f"{path!r}: a palette is float [k, 3], got {palette.dtype} {list(palette.shape)}")
    if not np.isfinite(palette).all() or np.abs(palette).max(initial=0) > 1 + 1e-6:
        raise ValueError(f"{path!r}: palette colours must lie in [-1, 1] (pixel/127.5 - 1)")
    return palette.astype(np.float32)


def one_palette(*named, n_vocab=None):
    """The palette that every (name, palette) pair holds, pairs whose palette is None left out, or None when no
    pair has one. Palettes that differ, or one whose size is not n_vocab (a model's), are a ValueError naming
    them: a token means another colour in each."""
    given = [(name, np.asarray(p, np.float32)) for name, p in named if p is not None]
    if given and n_vocab is not None and len(given[0][1]) != n_vocab:
        raise ValueError(f"the palette of {given[0][0]} has {len(given[0][1])} colours but the model has "
                         f"{n_vocab} tokens: give the data and the model of one palette")
    for (a, pa), (b, pb) in zip(given, given[1:]):
        if pa.shape != pb.shape or not np.allclose(pa, pb, rtol=0, atol=1e-6):
            raise ValueError(f"the palettes of {a} ({len(pa)} colours) and {b} ({len(pb)} colours) differ: "
                             "tokens of one are other colours in the other; quantize the images with the model's "
                             "palette (quantize.py --palette CHECKPOINT.pt)")
    return given[0][1] if given else None


def model_palette(model, path, name):
    """The palette to draw a model's tokens with: the file at path when given, else model.palette (from name), as
    float32 [n_vocab, 3]; a ValueError says what to give when there is none or it does not fit the model."""
    palette = load_palette(path) if path else model.palette
    if palette is None:
        raise ValueError(f"{name} holds no palette: give one with --palette kmeans_centers.npy")
    palette = np.asarray(palette, dtype=np.float32)
    if palette.shape != (model.config.n_vocab, 3):
        raise ValueError(f"the palette has shape {list(palette.shape)} but the model needs [{model.config.n_vocab}, 3]")
    return palette


def find_palette(prefix):
    """The palette for token files `prefix`: {prefix}_palette.npy, else kmeans_centers.npy beside them, else None."""
    for path in (f"{prefix}_palette.npy", os.path.join(os.path.dirname(prefix), "kmeans_centers.npy")):
        if os.path.isfile(path):
            return path
    return None
