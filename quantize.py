"""
Images to iGPT token files: read a dataset, fit (or load) the k-means colour palette, write the tokens.

    python quantize.py shapes --test shapes --num_images 5000 --n_px 16 --k 4 --out data/shapes  # the built-in shapes
    python quantize.py data/cifar10-jpeg.zip:train --test data/cifar10-jpeg.zip:test --out data/cifar10
    python quantize.py cifar10:train --test cifar10:test --download data --out data/cifar10
    python quantize.py photos/ --out data/photos --palette kmeans_centers.npy --unlabelled
    python quantize.py photos/ --out data/photos --palette out/ckpt.pt --unlabelled   # a model's own palette

It writes {out}_trX.npy (uint16 [N, n_px*n_px]) and {out}_trY.npy (int64 labels), {out}_vaX/_vaY (a seeded
--val_frac of the training images held out), {out}_teX/_teY (from --test), {out}_palette.npy and a preview,
{out}_preview.png (originals beside their quantized versions): the original release's naming, so train.py and
probe.py read ours and the original's alike (data.load_tokens). When the palette is fitted, it is fitted on the
training split only. Last comes {out}_manifest.json, naming every file of the set with its checksum: readers check
the files against it, so a run cut short (or a file from another run) is refused rather than mixed in.

A SOURCE is PATH[:SPLIT] as data.py reads it: a folder with one sub-folder per class (or of images without
classes), the same inside a .zip (data.zip:train reads its train/ folder), CIFAR-10/100's pickle folder,
downsampled ImageNet .npz batches, a uint8 .npy [N, H, W, 3] or a single image file; or one of these words:
  - cifar10 and cifar100: that pickle folder under --download (fetched there first when missing); SPLIT is
    train or test;
  - `shapes`: the built-in procedural dataset (data.make_shapes), --num_images of them (a fifth as many for
    shapes:test, drawn with seed+1).
Several training SOURCEs are concatenated. Each image becomes RGB n_px x n_px (data.to_rgb); the palette is
palette.py's k-means.
"""
import argparse
import math
import os
import sys
import time

import numpy as np

from common import add_device_options, argument_parser, log, resolve_device, save_grid, save_npy, script, set_threads
from data import (CIFAR, SPLITS, begin_set, download_cifar, finish_set, holdout, load_images, make_shapes,
                  manifest_path)
from palette import decode, encode, fit_palette, load_palette, palette_mse


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
    p = argument_parser(__doc__)
    p.add_argument("source", nargs="+", help="training images: SOURCE[:SPLIT] (see above); several are joined")
    p.add_argument("--out", required=True, default=argparse.SUPPRESS,
                   help="prefix of the files written: OUT_trX.npy, ..., e.g. data/cifar10")
    p.add_argument("--test", nargs="+", default=[], metavar="SOURCE",
                   help="test images (OUT_teX/teY), e.g. data.zip:test")
    p.add_argument("--palette", default="", help="a palette to use: a .npy such as the original kmeans_centers.npy, "
                                                 "or a checkpoint .pt, whose palette is taken ('': fit one on the "
                                                 "training split)")
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
    add_device_options(p)
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    args = p.parse_args(argv)
    if not 0 <= args.val_frac < 1:
        p.error("--val_frac must lie in [0, 1)")
    if not 1 <= args.k <= 65536:
        p.error(f"--k {args.k}: a palette holds 1 to 65536 colours (tokens are uint16)")
    for name in ("iters", "n_px", "num_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: it must be at least 1")
    if args.workers < 0:
        p.error(f"--workers {args.workers}: it cannot be negative (0: one per CPU)")
    return args


@script
def main(argv=None):
    args = parse_args(argv)
    device = str(resolve_device(args.device))
    set_threads(args.threads)
    out = {f"{s}{xy}": f"{args.out}_{s}{xy}.npy" for s in SPLITS for xy in "XY"}
    out |= {"palette": f"{args.out}_palette.npy", "preview": f"{args.out}_preview.png",
            "manifest": manifest_path(args.out)}
    existing = [p for p in out.values() if os.path.exists(p)]
    if existing and not args.force:
        raise SystemExit(f"refusing to overwrite {', '.join(existing)}: pass --force, or choose another --out")
    times = {}

    t0 = time.perf_counter()
    images, labels, classes = read_sources(args.source, args)
    test = read_sources(args.test, args, test=True) if args.test else None
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
    begin_set(args.out)  # from here until finish_set, readers refuse the set
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
    for p in set(out.values()) - set(written) - {out["manifest"]}:  # with --force, no file of an earlier run stays
        if os.path.exists(p):
            os.remove(p)
    finish_set(args.out, written)
    times["write"] = time.perf_counter() - t0

    counts = ", ".join(f"{s} {len(x)}" for s, (x, _) in splits.items())
    print(f"images ({args.n_px}x{args.n_px}): {counts}")
    print(f"classes: {len(classes)}" + (f" ({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''})"
                                        if classes else " (unlabelled)"))
    print(f"palette: {len(palette)} colours, " + (f"from {args.palette}" if args.palette else "fitted on tr")
          + f"; mse per pixel on tr {mse:.6f} (rms {127.5 * math.sqrt(mse / 3):.2f} of 255 per channel)")
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    print(f"wrote {', '.join(written + [out['manifest']])}")
    return {"images": {s: len(x) for s, (x, _) in splits.items()}, "classes": classes, "palette_mse": mse,
            "seconds": times}


if __name__ == "__main__":
    main(sys.argv[1:])
