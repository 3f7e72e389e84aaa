"""
Linear probes: the paper's headline evaluation. For each layer l of a trained iGPT, the residual stream after
block l, normalised by the model's norm (no mean subtraction) without its gain and averaged over positions, is the
feature of an image; a multinomial logistic regression on these features measures how linearly separable the
classes are at depth l.

    python probe.py --ckpt igpt_s.pt --data data/cifar10                     # every layer (the default*)
    python probe.py --ckpt igpt_s.pt --data data/cifar10 --layers 8,12,16    # or 10-20, or --layer 16
    python probe.py --ckpt igpt_s.pt --data data/cifar10 --Cs 0.01,0.1,1     # another grid of C
    python probe.py --ckpt out/ckpt.pt --data data/shapes --baseline          # and the raw pixels beside them
    python probe.py --ckpt out/ckpt.pt --data data/cifar10 --concat 6,9,12    # and those layers' features joined

The data are quantize.py's token files {data}_{tr,va,te}{X,Y}.npy (or the original release's, through
load_tokens): va is the seeded 10% of the training set held out for choosing the regularisation.
*Every layer by default: one pass costs the forward up to the deepest layer asked for anyway, the fits cost
little beside it, and the curve over depth shows where the best features lie (in the middle of the network, per
the paper).

1. Features: every requested layer comes out of one forward pass (model.features), in batches on the GPU in
   bf16 (fp32 on the CPU). They are cached, one file per split and layer (and mask, for a BERT model), in
   {out}/features/{key}/, where key hashes the checkpoint's path, size and modification time and the data
   files', so a sweep over more layers or other C values never reruns the model for features it has (float32:
   123 MB a layer for the 60,000 images of CIFAR-10 through iGPT-S, 2.9 GB for all 24 layers).
2. Fit, per layer, on --fit_device (by default the --device): features standardised with the training mean and
   std; multinomial logistic regression with an L2 penalty in scikit-learn's convention (sum of log-losses +
   ||W||^2 / (2C), bias unpenalised), by full-batch L-BFGS to a gradient tolerance, for each C of the grid on tr.
   The C with the best va accuracy is refit on tr + va (standardised with their mean and std), and that model's
   te accuracy is reported. With --fit_device cpu a probe beside a training on the same GPU holds it only for the
   feature pass.
3. Output: the table (layer, C, val acc, test acc) printed and written to {out}/probe.json, and the accuracy
   against depth drawn to {out}/probe.png.

A BERT model is probed as the paper probes its BERT models (section 4.6): its inputs are masked at probe time as
in training, to keep them in the distribution it learnt. Each image is read under a mask hiding bert_mask_prob
(15%) of its positions, fixed by the split, the mask's number and the image alone (igpt.fixed_mask), so the
features are the same in every run and cache; the features average over every position, masked ones included, as
the original's do. With --bert_masks K (the paper tried 5), each va and te image is read under K independent masks
and the prediction counted is the mode of the K predictions, ties broken at random (seeded); the probe is fitted on
the features of one mask of each training image.

With --concat the same probe is also fitted on the features of several layers joined end to end (one vector of
len(layers) x n_embd an image), as the paper probes iGPT-XL on five of its layers.

With --baseline the same probe is also fitted on the raw quantized pixels (each pixel's palette colour, the image
exactly as the model reads it): what a linear classifier gets without the model, the floor its features should
clear.
"""
import hashlib
import json
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from engine import fuse_mlp
from igpt import IGPT, fixed_mask
from common import (add_device_options, argument_parser, atomic_write, default_device, load_npy, log,
                    resolve_device, save_npy, script, set_threads, switch, write_json)
from data import SPLITS, check_tokens, load_tokens, tokens_palette
from palette import one_palette

DEFAULT_CS = "0.001,0.003,0.01,0.03,0.1,0.3,1,3,10"


def parse_layers(spec, n_layer):
    """Layer numbers (1 = after the first block) from "all", "16", "8,12,16" or "10-20", or a list of them."""
    if not isinstance(spec, str):
        spec = ",".join(map(str, spec))
    if spec == "all":
        return list(range(1, n_layer + 1))
    layers = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            layers += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ValueError(f"cannot read layers {spec!r}: use all, 16, 8,12,16 or 10-20") from None
    bad = [l for l in layers if not 1 <= l <= n_layer]
    if bad or not layers:
        raise ValueError(f"layers {bad or spec} do not exist: this model's layers are 1..{n_layer}")
    return sorted(set(layers))


def layer_spec(layers):
    """The shortest spec parse_layers reads back as these sorted layers: [8, 9, 10, 12] -> "8-10,12"."""
    runs = []
    for l in layers:
        if runs and l == runs[-1][1] + 1:
            runs[-1][1] = l
        else:
            runs.append([l, l])
    return ",".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in runs)


# ---- features ----

@torch.no_grad()
def extract_features(model, X, layers, batch_size=256, device=None, compile=False, progress=None, mask_seed=0):
    """Probe features of token images X (integer [N, n_px*n_px]: numpy, a memory map, or torch) at each of
    `layers`, all from one forward pass per batch: float32 [N, len(layers), n_embd] on the CPU. A BERT model reads
    image i (the row of X) under fixed_mask([i], config, mask_seed).

    The model is moved to `device` (default: CUDA when there is one) and, on CUDA, cast to bf16 in place: weights
    and residual stream in bf16 move half the bytes of autocast's float32 ones, and the MLP runs its fused
    product (engine.fuse_mlp); the features differ from float32's about as much as autocast's do. The CPU stays
    in float32. compile: torch.compile the whole feature pass, so each block's residual add fuses with the
    next block's norm and with the pooling (the last batch is padded to full size so no shape recompiles).
    progress: a label to print progress (images/s) under."""
    c = model.config
    check_tokens(X, "the probe's images", c.n_vocab, c.block_size)
    device = torch.device(device or default_device())
    model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    if device.type == "cuda":
        fuse_mlp(model)
    features = torch.compile(model.features) if compile else model.features
    out = torch.empty(len(X), len(layers), c.n_embd)
    copies = _HostCopies(out, (batch_size, len(layers), c.n_embd)) if device.type == "cuda" else None
    t0 = last = time.time()
    for i in range(0, len(X), batch_size):
        xb = torch.from_numpy(np.asarray(X[i:i + batch_size], dtype=np.int64))
        if copies is not None:  # from pinned memory the copy does not wait for the batches still running
            xb = xb.pin_memory()
        xb = xb.to(device, non_blocking=True)
        n = len(xb)
        mask = fixed_mask(range(i, i + n), c, mask_seed).to(device) if c.bert else None
        if compile:
            xb = F.pad(xb, (0, 0, 0, batch_size - n))
            mask = None if mask is None else F.pad(mask, (0, 0, 0, batch_size - n), value=False)
        if copies is None:
            out[i:i + n] = features(xb, layers, mask=mask)[:n]
        else:
            copies.start(features(xb, layers, mask=mask)[:n], i)
        if progress and (time.time() - last > 10 or i + n == len(X)):
            last = time.time()
            log(f"{progress}: {i + n}/{len(X)} images, {(i + n) / (last - t0):.0f} images/s")
    if copies is not None:
        copies.finish()
    return out


class _HostCopies:
    """Device-to-host copies of feature batches that overlap the next batches' forward passes: each batch is
    copied into a free pinned buffer without stopping the GPU, and moves on into `out` when that buffer is needed
    again, two batches later, so the GPU never waits for the host."""

    def __init__(self, out, shape):
        self.out = out
        self.free = [torch.empty(shape, pin_memory=True) for _ in range(2)]
        self.pending = []  # (event, buffer, start, count), oldest first

    def start(self, feats, start):
        if not self.free:
            self._drain()
        buffer = self.free.pop()
        buffer[:len(feats)].copy_(feats, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((event, buffer, start, len(feats)))

    def _drain(self):
        event, buffer, start, count = self.pending.pop(0)
        event.synchronize()
        self.out[start:start + count] = buffer[:count]
        self.free.append(buffer)

    def finish(self):
        while self.pending:
            self._drain()


def cache_dir(ckpt, data, out_dir):
    """The folder of cached features for this checkpoint and these data: named by a hash of the checkpoint's
    path, size and modification time and of the data files', so features of another model, another version
    of the file or other data are never read. A meta.json inside says what it holds."""
    files = [ckpt] + [f"{data}_{split}X.npy" for split in SPLITS]
    ident = {f: [(st := os.stat(f)).st_size, st.st_mtime_ns] if os.path.exists(f) else None for f in files}
    ident = {"ckpt": os.path.abspath(ckpt), "data": os.path.abspath(data), "files": ident}
    key = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(out_dir, "features", key)
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "meta.json"), ident)
    return folder


def cached_feature_paths(model, X, split, layers, folder, masks=1, **kwargs):
    """Paths of the features of each layer of one split, a list per layer of one path per mask (masks of them for a
    BERT model, else one), extracting in one pass per mask those not yet in `folder`."""
    names = [f"_mask{k}" for k in range(masks)] if model.config.bert else [""]
    paths = {l: [os.path.join(folder, f"{split}_layer{l:03d}{name}.npy") for name in names] for l in layers}
    for k in range(len(names)):
        missing = [l for l in layers if not os.path.exists(paths[l][k])]
        if missing:
            feats = extract_features(model, X, missing, progress=f"features {split}",
                                     mask_seed=(SPLITS.index(split), k), **kwargs)
            for j, l in enumerate(missing):
                save_npy(paths[l][k], feats[:, j].numpy())
    return paths


# ---- logistic regression ----

class NotConverged(UserWarning):
    """fit_logistic stopped with its largest gradient entry, .grad, still above tol: at its limit (.at_limit: of
    max_iter iterations, or of torch's 1.25 x max_iter loss evaluations), or where the loss stopped changing."""

    def __init__(self, grad, tol, C, iterations, at_limit):
        why = "at its limit of iterations or evaluations" if at_limit else "the loss no longer changing"
        super().__init__(f"L-BFGS stopped after {iterations} iterations, {why}, with gradient {grad:.1e} > "
                         f"tol={tol:.0e} (C={C})")
        self.grad, self.at_limit = grad, at_limit


def fit_logistic(X, y, C, max_iter=1000, tol=1e-4, device=None, init=None, n_classes=None):
    """Multinomial logistic regression with an L2 penalty, as scikit-learn's LogisticRegression(C=C) with K > 2
    classes: minimise sum_i -log p(y_i | x_i) + ||W||^2 / (2C), bias unpenalised, where p = softmax(x W + b).

    Full-batch L-BFGS (strong Wolfe line search) on the objective divided by N, as scikit-learn's lbfgs does, until
    its largest gradient entry is at most tol (else it warns NotConverged). X: float [N, D]; y: class indices [N] in
    0..K-1; n_classes: K (default: max(y) + 1; give it when a class may be missing from y); init: a (W, b) of K
    classes to start from. Returns W float32 [D, K] and b [K] on device, b centred (softmax ignores a shared shift).
    For two classes this is the two-vector softmax model, not scikit-learn's single-vector one."""
    device = device or default_device()
    X = torch.as_tensor(X, dtype=torch.float32, device=device)
    y = torch.as_tensor(y, dtype=torch.long, device=device)
    N, D = X.shape
    W = torch.zeros(D, n_classes or int(y.max()) + 1, device=device)
    b = torch.zeros(W.size(1), device=device)
    if init is not None:
        W.copy_(init[0]), b.copy_(init[1])
    W.requires_grad_(), b.requires_grad_()
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(X @ W + b, y) + W.pow(2).sum() / (2 * C * N)
        loss.backward()
        return loss

    opt.step(closure)
    grad, state = max(W.grad.abs().max().item(), b.grad.abs().max().item()), opt.state[W]
    if grad > tol:
        at_limit = state["n_iter"] >= max_iter or state["func_evals"] >= opt.defaults["max_eval"]
        warnings.warn(NotConverged(grad, tol, C, state["n_iter"], at_limit))
    return W.detach(), (b - b.mean()).detach()


def standardise(train, *others):
    """Subtract the mean and divide by the std of train (1 where a feature is constant) from each array."""
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 0, std, 1.0)
    return [(x - mean) / std for x in (train, *others)]


def accuracy(W, b, X, y):
    """The share of y predicted from features X [N, D]; or from X [K, N, D], K views of each image (a BERT model's
    masks), by the mode of their K predictions, ties broken at random (seeded, so the same on every call)."""
    predictions = (X @ W + b).argmax(-1)
    if X.dim() == 3:
        votes = F.one_hot(predictions, W.size(1)).sum(0).float()
        noise = torch.rand(votes.shape, generator=torch.Generator(X.device).manual_seed(0), device=X.device)
        predictions = (votes + noise / 2).argmax(-1)  # below one vote: it only orders the tied classes
    return (predictions == y).float().mean().item()


def probe_layer(train, val, test, Cs, device=None, max_iter=1000, tol=1e-4):
    """One layer's probe. train, val, test: (features, labels [N]) pairs, features [N, D], or for val and test
    [K, N, D] under K masks (see accuracy; the first mask's join train in the refit). Fits each C of Cs on train
    (ascending, each started from the last solution), takes the C of best val accuracy (the smallest on a tie),
    refits it on train + val and returns {"C", "val_acc", "test_acc", "val_accs" (one per C)}. Every fit has a
    class for each label of the three splits, seen in its fitting set or not."""
    device = device or default_device()
    (Xtr, ytr), (Xva, yva), (Xte, yte) = [(torch.as_tensor(x, device=device, dtype=torch.float32),
                                           torch.as_tensor(y, device=device)) for x, y in (train, val, test)]
    # one K for every fit: the refit starts from a fit on train alone, which may lack a class val holds
    n_classes = int(max(y.max() for y in (ytr, yva, yte))) + 1
    Str, Sva = standardise(Xtr, Xva)
    fit, val_accs, best = None, [], None
    for C in sorted(Cs):
        fit = fit_logistic(Str, ytr, C, max_iter, tol, device, init=fit, n_classes=n_classes)
        val_accs.append(accuracy(*fit, Sva, yva))
        if best is None or val_accs[-1] > best[1]:
            best = (C, val_accs[-1], fit)
    C, val_acc, fit = best
    Strva, Ste = standardise(torch.cat([Xtr, Xva if Xva.dim() == 2 else Xva[0]]), Xte)
    fit = fit_logistic(Strva, torch.cat([ytr, yva]), C, max_iter, tol, device, init=fit, n_classes=n_classes)
    return {"C": C, "val_acc": val_acc, "test_acc": accuracy(*fit, Ste, yte), "val_accs": val_accs}


# ---- the sweep, the table and the plot ----

def load_features(paths):
    """A layer's features of one split from its files: [N, D] from one, [K, N, D] from K (one a mask)."""
    arrays = [load_npy(p, fix="delete it, and the features are extracted again") for p in paths]
    return arrays[0] if len(arrays) == 1 else np.stack(arrays)


def load_split(data, split):
    X, Y = load_tokens(data, split)
    if Y is None:
        raise FileNotFoundError(f"the probe needs labels, and {data}_{split}Y.npy is missing: "
                                "quantize.py writes it beside the tokens")
    return X, Y


def pixel_features(X, palette):
    """Token images X [N, n_px*n_px] as their raw quantized pixels: each token's palette colour (in [-1, 1], as the
    palette holds it), float32 [N, n_px*n_px*3]."""
    X = torch.from_numpy(np.asarray(X, dtype=np.int64))
    return torch.as_tensor(palette, dtype=torch.float32)[X].flatten(1)


def probe_layers(ckpt, data, layers="all", Cs=DEFAULT_CS, out="out/probe", batch_size=256, device=None,
                 compile=None, max_iter=1000, tol=1e-4, bert_masks=1, baseline=False, concat=None, force=False,
                 fit_device=None):
    """Probe each layer of the checkpoint on the data (see the module docstring): features from the cache or one
    forward pass per split, a fit per C and layer, the table printed and written to {out}/probe.json and the
    plot to {out}/probe.png (existing ones only with force). layers: a spec for parse_layers or a list; Cs:
    "0.01,0.1" or a list; compile: torch.compile the feature pass (default: on CUDA); bert_masks: for a BERT model,
    the masks each va and te image is read under (their predictions' mode counts); baseline: also probe the raw
    quantized pixels (pixel_features, with the palette of the checkpoint or the data), the floor the features
    should clear; concat: layers (a spec or a list) whose features are also probed joined; fit_device: where the
    fits run (default: device), the CPU to leave a GPU shared with a training to it after the feature pass (the
    fits' many small steps each wait their turn behind its kernels there). Returns the report
    written to probe.json: {"ckpt", "data", "Cs", "rows" (one per layer), "pixels" (the baseline's probe_layer
    result, or None), "concat" (the joined layers' result with their "layers", or None)}."""
    device = device or default_device()
    fit_device = fit_device or device
    existing = [p for p in (os.path.join(out, "probe.json"), os.path.join(out, "probe.png")) if os.path.exists(p)]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists: pass --force to overwrite it, or choose another --out")
    model = IGPT.from_checkpoint(ckpt)
    if bert_masks < 1 or (bert_masks > 1 and not model.config.bert):
        raise ValueError(f"bert_masks={bert_masks}: it must be at least 1, and above 1 only for a BERT model "
                         "(an autoregressive one reads every image whole)")
    palette = one_palette(tokens_palette(data), (ckpt, model.palette), n_vocab=model.config.n_vocab)
    if baseline and palette is None:
        raise FileNotFoundError(f"the pixel baseline needs the palette the tokens index: {ckpt} holds none "
                                f"and {data}_palette.npy is missing")
    layers = parse_layers(layers, model.config.n_layer)
    joined = parse_layers(concat, model.config.n_layer) if concat else []
    Cs = sorted(float(c) for c in (Cs.split(",") if isinstance(Cs, str) else Cs))
    if not Cs or Cs[0] <= 0:
        raise ValueError(f"C values must be positive, got {Cs}")
    splits = {split: load_split(data, split) for split in SPLITS}
    for split, (X, _) in splits.items():  # all of them before the first is read through the model
        check_tokens(X, f"{data}_{split}X.npy", model.config.n_vocab, model.config.block_size)
    folder = cache_dir(ckpt, data, out)
    compile = switch("auto", device) if compile is None else compile
    paths = {split: cached_feature_paths(model, X, split, sorted({*layers, *joined}), folder,
                                    1 if split == "tr" else bert_masks,
                                    batch_size=batch_size, device=device, compile=compile)
             for split, (X, _) in splits.items()}
    bert = model.config.bert
    del model
    labels = {s: torch.from_numpy(np.asarray(splits[s][1])) for s in SPLITS}
    rows, pixels, joint = [], None, None
    show = lambda name, r: print(f"{name:>6} {r['C']:8.3g} {100 * r['val_acc']:7.2f}% {100 * r['test_acc']:7.2f}%",
                                 flush=True)
    print(f"{'layer':>6} {'C':>8} {'val acc':>8} {'test acc':>8}")
    with warnings.catch_warnings(record=True) as caught:  # fits stopped short: counted in one note below
        warnings.simplefilter("always", NotConverged)
        for l in layers:
            rows.append({"layer": l, **probe_layer(*[(load_features(paths[s][l]), labels[s]) for s in SPLITS], Cs,
                                                   fit_device, max_iter, tol)})
            show(l, rows[-1])
        if baseline:
            pixels = probe_layer(*[(pixel_features(splits[s][0], palette), labels[s]) for s in SPLITS], Cs,
                                 fit_device, max_iter, tol)
            show("pixels", pixels)
        if joined:
            joint = {"layers": joined, **probe_layer(*[(np.concatenate([load_features(paths[s][l]) for l in joined],
                                                                       -1), labels[s]) for s in SPLITS],
                                                     Cs, fit_device, max_iter, tol)}
            show(layer_spec(joined), joint)
    stopped = [w.message for w in caught if issubclass(w.category, NotConverged)]
    for w in caught:
        if not issubclass(w.category, NotConverged):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if stopped:
        fits = (len(layers) + bool(baseline) + bool(joined)) * (len(Cs) + 1)  # each probe: every C, then the refit
        log(f"note: {len(stopped)} of {fits} fits stopped with the gradient above --tol {tol:.0e} (at most "
            f"{max(w.grad for w in stopped):.1e}), {sum(w.at_limit for w in stopped)} of them at the limit of "
            f"--max_iter {max_iter}, which a larger one lifts, the rest where the loss no longer changed")
    best = max(rows, key=lambda r: r["val_acc"])
    print(f"best layer by val acc: {best['layer']}, test acc {100 * best['test_acc']:.2f}%"
          + (f" (the raw pixels: {100 * pixels['test_acc']:.2f}%)" if pixels else "")
          + (f"; layers {layer_spec(joined)} joined: {100 * joint['test_acc']:.2f}%" if joint else ""))
    masks = {"bert_masks": bert_masks} if bert else {}
    report = {"ckpt": ckpt, "data": data, "Cs": Cs, **masks, "rows": rows, "pixels": pixels, "concat": joint}
    write_json(os.path.join(out, "probe.json"), report)
    across = [(name, result, color) for name, result, color in
              (("pixels", pixels, "orange"), (f"layers {layer_spec(joined)} joined", joint, "green")) if result]
    plot(rows, os.path.join(out, "probe.png"), title=f"linear probe: {os.path.basename(ckpt)}", across=across)
    return report


def plot(rows, path, title="linear probe", size=(640, 400), across=()):
    """Validation and test accuracy against layer, as a PNG drawn with PIL; and the test accuracy of each
    (name, probe_layer result, colour) of `across` (the raw pixels', the joined layers') as a dashed line across."""
    w, h = size
    x0, y0, x1, y1 = 60, 30, w - 20, h - 45  # the plotting area
    layers = [r["layer"] for r in rows]
    accs = [100 * r[k] for r in rows for k in ("val_acc", "test_acc")] + [100 * res["test_acc"] for _, res, _ in across]
    lo, hi = 10 * (min(accs) // 10), 10 * (max(accs) // 10 + 1)
    lmin, lmax = min(layers), max(layers)
    px = lambda l: x0 + (x1 - x0) * (l - lmin + 0.5) / (lmax - lmin + 1)
    py = lambda a: y1 - (y1 - y0) * (a - lo) / (hi - lo)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    for a in range(int(lo), int(hi) + 1, 10):
        d.line([(x0 - 4, py(a)), (x0, py(a))], fill="black")
        d.text((x0 - 8, py(a)), f"{a}", fill="black", anchor="rm")
    for l in range(lmin, lmax + 1, max(1, (lmax - lmin + 1) // 12)):
        d.line([(px(l), y1), (px(l), y1 + 4)], fill="black")
        d.text((px(l), y1 + 6), str(l), fill="black", anchor="mt")
    d.text(((x0 + x1) / 2, h - 8), "layer", fill="black", anchor="md")
    d.text((8, 8), "accuracy (%)", fill="black")
    d.text(((x0 + x1) / 2, 8), title, fill="black", anchor="mt")
    for k, color in (("val_acc", "gray"), ("test_acc", "blue")):
        pts = [(px(r["layer"]), py(100 * r[k])) for r in rows]
        d.line(pts, fill=color, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    for name, color, x in (("test", "blue", x1), ("val", "gray", x1 - 36)):  # the key: above the plot, off the lines
        d.text((x, 8), name, fill=color, anchor="ra")
    for name, result, color in across:
        y = py(100 * result["test_acc"])
        for x in range(x0, x1, 12):
            d.line([(x, y), (min(x + 6, x1), y)], fill=color, width=2)
        d.text((x0 + 6, y - 3), name, fill=color, anchor="ld")  # above its line, at the left
    atomic_write(path, lambda f: img.save(f, format="PNG"))


@script
def main(argv=None):
    p = argument_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="model checkpoint (ours, or an original one after convert.py)")
    p.add_argument("--data", required=True, help="token files' prefix: {data}_trX.npy, ... (from quantize.py)")
    p.add_argument("--layers", "--layer", default="all",
                   help="layers to probe: all, one (16), a list (8,12,16) or a range (10-20)")
    p.add_argument("--Cs", default=DEFAULT_CS, metavar="C,C,...",
                   help="inverse regularisation strengths to choose from on va, as scikit-learn's C")
    p.add_argument("--out", default="out/probe", help="folder for probe.json, probe.png and the feature cache")
    p.add_argument("--batch_size", type=int, default=256, help="images a forward pass")
    p.add_argument("--concat", default="", help="also probe these layers' features joined end to end (e.g. "
                   "6,9,12 or 8-12; '': no)")
    p.add_argument("--baseline", action="store_true", help="also probe the raw quantized pixels (each pixel's "
                   "palette colour), the floor the features should clear")
    add_device_options(p, compile_what="the feature pass")
    p.add_argument("--fit_device", default="", help="where the logistic fits run ('': the --device); cpu leaves "
                   "a GPU shared with a training to it once the features are out")
    p.add_argument("--bert_masks", type=int, default=1, help="BERT models: the fixed masks each va and te image is "
                   "read under, the mode of their predictions counting (the paper's ensemble: 5)")
    p.add_argument("--max_iter", type=int, default=1000, help="L-BFGS iterations per fit (and 1.25 times as many "
                   "loss evaluations, torch's limit)")
    p.add_argument("--tol", type=float, default=1e-4, help="L-BFGS stops when the largest gradient entry of "
                   "the mean objective is at most this")
    p.add_argument("--force", action="store_true", help="overwrite probe.json and probe.png of an earlier run")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    fit_device = resolve_device(args.fit_device) if args.fit_device else device
    set_threads(args.threads)
    return probe_layers(args.ckpt, args.data, args.layers, args.Cs, args.out, args.batch_size, str(device),
                        switch(args.compile, device), args.max_iter, args.tol, args.bert_masks,
                        args.baseline, args.concat or None, args.force, str(fit_device))


if __name__ == "__main__":
    main()
