"""
Sample images from an iGPT checkpoint into a PNG grid (and the raw tokens as .npy).

    python sample.py --ckpt igpt_s.pt                                     # 16 samples: samples.png, samples.npy
    python sample.py --ckpt igpt_s.pt --prime photos/ --prime_rows 16     # complete the bottom halves, 4 each
    python sample.py --ckpt out/ckpt.pt --prime data/cifar10_teX.npy --out out   # out/completions.png, .npy
    python sample.py --ckpt igpt_s.pt --fast off                          # the plain path (igpt.generate)

Unconditional samples go to OUT/samples.png (a grid, in rows) and OUT/samples.npy (the tokens); completions to
OUT/completions.png, a row per primed image: the kept top rows in grey below, the completions, then the original.
Generation goes through engine.Engine: on a GPU the fused decode step, compiled and replayed as a CUDA graph, for
a model whose width and palette are multiples of 16 (engine.fused_step_runs); otherwise, or with --fast off, the
plain KV-cached igpt.generate. The same --seed gives the same images on the same device.
"""
import math
import os
import sys
import time

import numpy as np
import torch

from common import (Progress, add_generation_options, argument_parser, generation_dtype, generation_fast, load_npy,
                    resolve_device, save_grid, save_npy, script, set_threads, switch)
from data import TOKEN_FILE, check_tokens, load_images, load_tokens, tokens_palette
from engine import Engine
from igpt import IGPT, check_generative
from palette import decode, encode, model_palette, one_palette


def parse_args(argv=None):
    p = argument_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="checkpoint (ours, or an original converted by convert.py)")
    p.add_argument("--palette", default="", help="palette .npy (k x 3 in [-1, 1]), or a checkpoint .pt whose "
                                                 "palette is taken; '': the --ckpt's")
    p.add_argument("--out", default=".", help="folder for samples.png/.npy, or completions.png/.npy with --prime")
    p.add_argument("--num_samples", type=int, default=0,
                   help="images to sample, or with --prime completions per primed image (0: 16, or 4 with --prime)")
    p.add_argument("--prime", default="", help="images to complete: an image file, a folder, a .zip, or a token "
                                               ".npy file such as data/cifar10_teX.npy")
    p.add_argument("--num_prime", type=int, default=8, help="how many images of --prime to complete (the first ones)")
    p.add_argument("--prime_classes", action="store_true", help="take the --prime images class by class in turn "
                   "(the first of each class, then the second, ...) from their labels, not the first ones")
    p.add_argument("--prime_rows", type=int, default=0, help="rows of each primed image kept (0: n_px/2)")
    p.add_argument("--batch_size", type=int, default=64, help="sequences generated at once")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of every draw")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest colours only (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: the smallest set holding p (1: all)")
    p.add_argument("--seed", type=int, default=0, help="seeds the noise of every draw")
    add_generation_options(p)
    p.add_argument("--scale", type=int, default=4, help="pixel size of the grid images")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    args = p.parse_args(argv)
    for name, low in [("num_samples", 0), ("num_prime", 1), ("batch_size", 1), ("top_k", 0), ("scale", 1)]:
        if getattr(args, name) < low:
            p.error(f"--{name} must be at least {low}")
    if not 0 < args.top_p <= 1 or args.temperature <= 0:
        p.error("--top_p must lie in (0, 1] and --temperature be positive")
    return args


def load_prime(source, palette, n_px, n_vocab, count, by_class=False):
    """Up to `count` images to complete, as tokens [N, n_px*n_px] (from image files or a token .npy; a token file
    of a set quantize.py wrote must be of the set and of the palette sampled with). by_class: the images of
    classes_in_turn, from the labels of the class folders or of the token file's {prefix}_{split}Y.npy."""
    if not source.endswith(".npy"):
        images, labels, _ = load_images(source, n_px)
        if by_class and labels is None:
            raise SystemExit(f"--prime_classes needs labelled images: {source} has no class folders")
        return encode(images[classes_in_turn(labels, count) if by_class else slice(count)], palette).astype(np.int64)
    if not os.path.isfile(source):
        raise SystemExit(f"--prime {source!r}: no such file")
    token_file = TOKEN_FILE.fullmatch(source)
    token_file = token_file if token_file and token_file[3] == "X" else None
    if token_file:  # a split of a set: its manifest, its palette, its labels in any of the released forms
        one_palette(tokens_palette(token_file[1]), ("the model", palette))
        tokens, labels = load_tokens(token_file[1], token_file[2])
    else:
        tokens, labels = load_npy(source, fix="give integer tokens [N, n_px*n_px] saved with np.save",
                                  mmap_mode="r"), None
    if not np.issubdtype(tokens.dtype, np.integer):
        raise SystemExit(f"--prime {source!r}: expected integer tokens, got {tokens.dtype}")
    check_tokens(tokens, f"--prime {source!r}", n_vocab, n_px * n_px)
    if by_class:
        if labels is None:
            labels_path = f"{token_file[1]}_{token_file[2]}Y.npy" if token_file else ""
            raise SystemExit(f"--prime_classes needs the labels of {source}: "
                             f"{labels_path or 'a {prefix}_teY.npy beside a {prefix}_teX.npy'} is missing")
        tokens = tokens[classes_in_turn(labels, count)]
    return np.asarray(tokens[:count], dtype=np.int64)


def classes_in_turn(labels, count):
    """Indices of `count` images taken class by class in turn: the first image of each class (in class order),
    then the second of each, and so on."""
    labels = np.asarray(labels)
    rank = np.empty(len(labels), dtype=np.int64)  # rank[i]: how many images of i's class come before it
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    return np.lexsort((labels, rank))[:count]


def samples_layout(images):
    """Images [N, H, W, 3] in rows of ceil(sqrt(N)), black tiles after the last: [rows, cols, H, W, 3]."""
    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    grid = np.zeros((math.ceil(n / cols) * cols, h, w, 3), dtype=np.uint8)
    grid[:n] = images
    return grid.reshape(-1, cols, h, w, 3)


def kept_rows(images, rows):
    """A copy of images [N, H, W, 3] grey from row `rows` on: where the model has to fill in."""
    kept = images.copy()
    kept[:, rows:] = 128
    return kept


def completions_layout(originals, completions, prime_rows):
    """A row per primed image: its kept top prime_rows rows with grey below, its completions, then the original.
    originals [N, H, W, 3] and completions [N, per_image, H, W, 3] -> [N, per_image + 2, H, W, 3]."""
    return np.concatenate([kept_rows(originals, prime_rows)[:, None], completions, originals[:, None]], axis=1)


@script
def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    set_threads(args.threads)
    name = "completions" if args.prime else "samples"
    png, npy = os.path.join(args.out, name + ".png"), os.path.join(args.out, name + ".npy")
    for path in (png, npy):
        if os.path.exists(path) and not args.force:
            raise SystemExit(f"{path} exists: choose another --out or pass --force to overwrite it")

    model = IGPT.from_checkpoint(args.ckpt)
    check_generative(model, args.ckpt)
    palette = model_palette(model, args.palette, args.ckpt)
    n_px, n_vocab = model.config.n_px, model.config.n_vocab

    dtype = generation_dtype(args.dtype, device)
    model = model.to(device=device, dtype=dtype).eval()
    compile_step = switch(args.compile, device)
    fast = generation_fast(args.fast)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    if args.prime:
        prime_rows = args.prime_rows or n_px // 2
        if not 0 < prime_rows < n_px:
            raise SystemExit(f"--prime_rows must lie in 1..{n_px - 1}")
        originals = load_prime(args.prime, palette, n_px, n_vocab, args.num_prime, args.prime_classes)
        per_image = args.num_samples or 4
        prime = torch.from_numpy(np.repeat(originals[:, :prime_rows * n_px], per_image, axis=0))
        total = len(prime)
    else:
        per_image, prime, total = None, None, args.num_samples or 16

    try:
        sampler = Engine(model, fast=fast, compile=compile_step)  # its buffers and graphs serve every batch
    except ValueError as e:
        raise SystemExit(f"--fast on: {e}") from None
    path = "the fused step" if sampler.fast else "the plain path"
    print(f"sampling {total} images of {n_px}x{n_px} on {device} ({dtype}, {path}, compiled: {compile_step})")
    t0 = time.time()
    chunks, show = [], Progress()
    for start in range(0, total, args.batch_size):
        n = min(args.batch_size, total - start)

        def progress(done, of, tokens, start=start, n=n):
            if done % max(1, of // 20) == 0 or done == of:
                elapsed, part = time.time() - t0, (start + n * done / of) / total  # of all the images' tokens
                to_go = f", {elapsed * (1 / part - 1):.1f}s to go" if 0 < part < 1 else ""
                show(f"  images {start + 1}-{start + n} of {total}: token {done}/{of}, {elapsed:.1f}s{to_go}",
                     last=done == of and start + n == total)

        chunks.append(sampler.generate(num_samples=n, prime=None if prime is None else prime[start:start + n],
                                       temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                                       generator=generator, progress=progress).cpu())
    tokens = torch.cat(chunks).numpy().astype(np.uint16)
    elapsed = time.time() - t0
    print(f"{total} images in {elapsed:.1f}s ({total / elapsed:.2f} images/s, compile time included)")

    images = decode(tokens, palette)
    if prime is None:
        grid = samples_layout(images)
    else:
        grid = completions_layout(decode(originals, palette), images.reshape(len(originals), per_image, n_px, n_px, 3),
                                  prime_rows)
    save_grid(grid, png, scale=args.scale)
    save_npy(npy, tokens)
    print(f"wrote {png} and {npy}")
    return {"png": png, "npy": npy, "images": total, "seconds": elapsed}


if __name__ == "__main__":
    main(sys.argv[1:])
