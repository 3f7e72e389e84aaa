"""
Train iGPT on token files (as written by quantize.py, or the original release's), on the CPU, one GPU, or many
GPUs and nodes through torchrun; evaluate; resume; fine-tune with a classifier.

    python train.py --data data/cifar10 --model s                       # one GPU (or the CPU)
    torchrun --nproc_per_node=8 train.py --data data/cifar10            # DDP on 8 GPUs
    python train.py --config run.py --max_steps 5000                    # a file of overrides, then flags
    python train.py --resume --out out                                  # continue exactly where it stopped
    torchrun --nproc_per_node=8 train.py --model xl --fsdp --activation_checkpointing   # sharded (parallel.py)
    python train.py --model xl --fsdp --dry_run                         # the memory a GPU needs; no training
    python train.py --eval_only --ckpt igpt_s.pt --data downloads/imagenet --eval_split te
    python train.py --ckpt igpt_s.pt --clf --data data/cifar10          # fine-tune: classifier + generative loss
    python train.py --bert --data data/cifar10                          # pretrain with the BERT objective

Every option, its default and its meaning: python train.py --help. A config file (run.py above, any name) holds
`name = value` lines with option names and Python literals, e.g. `batch_size = 128`, read without running any code.

Checkpoints ({out}/ckpt.pt, or the folder ckpt.dcp of an --fsdp run, written atomically) come every --ckpt_minutes
and every --ckpt_interval steps, at each evaluation and at the end. Ctrl-C or SIGTERM finishes the step, writes one,
says how to resume and exits with status 128 + the signal's number; under torchrun every rank stops at the same step
(allow torchrun's --shutdown_timeout for the write). Nothing non-finite is ever saved: a run whose loss or weights
stop being finite ends, naming the last good checkpoint.
"""
import argparse
import ast
import inspect
import io
import json
import math
import os
import shutil
import signal
import sys
import time
import tokenize
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import parallel
from common import (SWITCH, argument_parser, atomic_write, first_nonfinite, load_npy, resolve_device, script,
                    set_threads, switch)
from data import check_tokens, load_tokens, tokens_palette
from igpt import IGPT, PRESETS, IGPTConfig, fixed_mask, save_checkpoint, weights_mismatch
from palette import load_palette, one_palette


@dataclass
class TrainConfig:
    # data and output
    data: str = "data/shapes"       # token files prefix: {data}_trX.npy, {data}_vaX.npy (quantize.py writes them)
    out: str = "out"                # the run's folder: ckpt.pt and log.jsonl go here
    palette: str = ""               # palette .npy stored in the checkpoint; default {data}_palette.npy, else
                                    # kmeans_centers.npy, where present
    flip: bool = False              # augment with horizontal flips (each row of n_px tokens reversed)
    crop: int = 0                   # augment with random crops: each image shifted up to this many pixels each
                                    # way, its edges mirrored into the gap (0: none)
    # model
    model: str = "s"                # size preset: s, m, l, xl (a --ckpt run takes its checkpoint's sizes)
    n_px: int = 0                   # image side; 0: the data's (--dry_run without data: 32)
    n_layer: int = 0                # layers; > 0 overrides the preset's
    n_embd: int = 0                 # width; > 0 overrides the preset's (a multiple of n_head)
    n_head: int = 0                 # attention heads; > 0 overrides the preset's
    ckpt: str = ""                  # start from this checkpoint's weights and sizes (ours or converted originals)
    clf: bool = False               # fine-tune: classifier on mean-pooled final features + generative loss
    gen_weight: float = 1.0         # with --clf, loss = clf_loss + gen_weight * gen_loss
    bert: bool = False              # the BERT objective: predict masked pixels with attention both ways
    bert_mask_prob: float = 0.0     # > 0 sets BERT's share of masked positions (else --ckpt's, or 0.15)
    # optimisation: the paper's recipe (Adam 0.9/0.95, no weight decay, warmup then cosine to 0)
    batch_size: int = 64            # images per optimizer step, over all GPUs and accumulation steps
    micro_batch_size: int = 0       # images per forward pass on one GPU (0: from the batch, at most 32)
    max_steps: int = 10000          # optimizer steps of the whole run
    learning_rate: float = 3e-3     # the peak, reached at the end of the warmup
    min_lr: float = 0.0             # where the cosine decay ends, at max_steps
    warmup_steps: int = 500         # steps of linear warmup from 0
    beta1: float = 0.9              # Adam's first-moment decay
    beta2: float = 0.95             # Adam's second-moment decay
    weight_decay: float = 0.0       # AdamW's, on the weight matrices and wte only (the paper uses none)
    grad_clip: float = 1.0          # max global gradient norm; 0 disables
    # evaluation, logging, checkpoints
    eval_interval: int = 1000       # steps between validation passes (each writes a checkpoint)
    eval_images: int = 0            # images of the split per evaluation; 0 means all of it
    eval_split: str = "va"          # split that evaluation reads: va (validation) or te (test)
    eval_only: bool = False         # evaluate --ckpt (or the --resume checkpoint) and exit
    log_interval: int = 10          # steps between log lines (the first step is logged too)
    ckpt_interval: int = 0          # steps between checkpoints; 0: only by the clock, evaluations and the end
    ckpt_minutes: float = 5.0       # write a checkpoint when this many minutes passed since the last; 0: never
    resume: bool = False            # continue {out}'s run (ckpt.pt; --fsdp: ckpt.dcp) with its options and any
                                    # given anew, but those of its model, objective, data and batches (refused)
    force: bool = False             # start over even though {out} holds a checkpoint or a log
    # system
    device: str = "auto"            # auto, cpu, cuda, cuda:N
    threads: int = 0                # PyTorch's CPU threads (0: $OMP_NUM_THREADS if set, else one per idle core)
    dtype: str = "bfloat16"         # autocast dtype on GPU: bfloat16 or float32 (the CPU always uses float32)
    compile: str = "auto"           # torch.compile: auto (on for GPU), on, off
    seed: int = 1337                # seeds the initialisation, the order of the batches, the flips, crops and
                                    # BERT masks
    fsdp: bool = False              # shard weights, gradients and optimizer state over the GPUs (FSDP2), not DDP
    activation_checkpointing: bool = False  # recompute each block in the backward: far less activation memory
    dry_run: bool = False           # print the memory a GPU needs for this configuration, and stop
    memory_check: bool = True       # refuse, before any work, a run the memory estimate says cannot fit the GPU
                                    # (--no-memory_check: let the GPU decide)


CHOICES = {"model": tuple(PRESETS), "eval_split": ("va", "te"), "dtype": ("bfloat16", "float32"),
           "compile": SWITCH}
ALIASES = {"ckpt": ["--init_from"], "out": ["--out_dir"]}  # the earlier spellings
RENAMED = {"init_from": "ckpt", "out_dir": "out"}  # in the train_config of checkpoints written before
RUN_DEFINING = ("data", "palette", "flip", "crop", "model", "n_layer", "n_embd", "n_head", "ckpt", "clf", "gen_weight",
                "bert", "bert_mask_prob", "batch_size", "seed")  # what --resume may not change: the model, the
# objective, the data and the order of the batches
POSITIVE = ("max_steps", "eval_interval", "log_interval")  # integers a run divides by or counts to
NON_NEGATIVE = ("micro_batch_size", "warmup_steps", "eval_images", "ckpt_interval", "ckpt_minutes", "grad_clip",
                "weight_decay", "min_lr", "gen_weight", "n_px", "n_layer", "n_embd", "n_head", "threads", "seed")
MICRO_BATCH = 32  # the largest micro-batch chosen when --micro_batch_size is 0


def parse_config(argv=None):
    """TrainConfig from defaults, then a --config file of overrides, then command-line flags. Also returns the
    names given explicitly, so --resume can take the rest from the checkpoint."""
    parser = argument_parser(__doc__)
    parser.add_argument("--config", default=argparse.SUPPRESS, help="file of `name = value` overrides (default: none)")
    comments = _field_comments()
    for f in fields(TrainConfig):
        help_text = f"{comments.get(f.name, '')} (default: {f.default!r})"
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(f"--{f.name}", *ALIASES.get(f.name, ()), dest=f.name, type=f.type,
                                choices=CHOICES.get(f.name), default=argparse.SUPPRESS, help=help_text)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", "")
    overrides = read_config_file(config_file) if config_file else {}
    given = {**overrides, **args}
    return TrainConfig(**given), set(given)


def _field_comments():
    """The `# comment` after each TrainConfig field, with the comment lines under it that start in its column,
    shown by --help."""
    out, field, column = {}, None, None
    for line in inspect.getsource(TrainConfig).splitlines():
        code, _, comment = line.partition("#")
        if ":" in code and comment:
            field, column = code.split(":")[0].strip(), len(code)
            out[field] = comment.strip()
        elif field and not code.strip() and len(code) == column:
            out[field] += " " + comment.strip()
        else:
            field = None
    return out


def read_config_file(path):
    """`name = value` lines with Python literal values; blank lines and # comments allowed."""
    if not os.path.isfile(path):
        raise SystemExit(f"config file {path!r} not found")
    known = {f.name: f for f in fields(TrainConfig)}
    out = {}
    for lineno, line in enumerate(open(path), 1):
        line = _without_comment(line).strip()
        if not line:
            continue
        name, eq, value = (s.strip() for s in line.partition("="))
        if not eq or name not in known:
            raise SystemExit(f"{path}:{lineno}: expected `name = value` with a name from train.py --help, "
                             f"got {line!r}")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f"{path}:{lineno}: {value!r} is not a Python literal (quote strings)")
        out[name] = _typed(value, known[name].type, CHOICES.get(name), f"{path}:{lineno}: {name}")
    return out


def _without_comment(line):
    """The line up to its # comment, if it has one; a # inside a quoted string is not one."""
    try:
        for token in tokenize.generate_tokens(io.StringIO(line).readline):
            if token.type == tokenize.COMMENT:
                return line[:token.start[1]]
    except (tokenize.TokenError, SyntaxError):  # an unclosed quote: the value's check says so
        pass
    return line


def _typed(value, kind, choices, where):
    """A config file's value as the field's type, as its flag would read it: an int where a float goes is widened,
    anything else of another type or outside the field's choices is refused."""
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise SystemExit(f"{where} = {value!r}: give {'an' if kind is int else 'a'} {kind.__name__}, as its flag "
                         "takes")
    if choices and value not in choices:
        raise SystemExit(f"{where} = {value!r}: choose from {', '.join(choices)}")
    return value


def check_ranges(cfg, given=()):
    """Fail before any work on values a run could not use: a zero interval, a negative count, a rate that is not a
    finite number in its range, --gen_weight without --clf (given: the options named explicitly)."""
    for f in fields(TrainConfig):
        if f.type is float and not math.isfinite(getattr(cfg, f.name)):
            raise SystemExit(f"--{f.name} {getattr(cfg, f.name)}: give a finite number")
    for name in POSITIVE:
        if getattr(cfg, name) <= 0:
            raise SystemExit(f"--{name} {getattr(cfg, name)}: it must be at least 1")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise SystemExit(f"--{name} {getattr(cfg, name)}: it cannot be negative")
    if cfg.learning_rate <= 0:
        raise SystemExit(f"--learning_rate {cfg.learning_rate}: it must be above 0")
    if cfg.min_lr > cfg.learning_rate:
        raise SystemExit(f"--min_lr {cfg.min_lr} is above --learning_rate {cfg.learning_rate}: the cosine decays "
                         "from the peak down to --min_lr")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise SystemExit(f"--{name} {getattr(cfg, name)}: Adam's decay rates lie in [0, 1)")
    if "gen_weight" in given and not (cfg.clf or cfg.resume):  # a resumed run's --clf is its checkpoint's
        raise SystemExit("--gen_weight weighs the generative loss beside the classifier of --clf: add --clf, or "
                         "drop the flag")


# ---- data ----

def load_data(cfg):
    """The run's data: (X_tr, Y_tr, X_va, Y_va, n_px, palettes, n_classes). The training split is not read for
    --eval_only (X_tr, Y_tr None), labels are None where their file is missing; palettes are the (path, palette)
    pairs of the data and of --palette, for one_palette to check against each other and the checkpoints';
    n_classes is the labels' count for a --clf training run, else 0."""
    X_tr, Y_tr = (None, None) if cfg.eval_only else load_tokens(cfg.data, "tr")
    X_va, Y_va = load_tokens(cfg.data, cfg.eval_split)
    n_px = math.isqrt(X_va.shape[1])
    if n_px * n_px != X_va.shape[1]:
        raise SystemExit(f"{cfg.data}: images of {X_va.shape[1]} tokens are not square")
    if cfg.n_px and cfg.n_px != n_px:
        raise SystemExit(f"--n_px {cfg.n_px}, but {cfg.data} holds {n_px}x{n_px} images")
    if not 0 <= cfg.crop < n_px:
        raise SystemExit(f"--crop {cfg.crop}: a shift must lie in 0..{n_px - 1} for {n_px}x{n_px} images")
    palettes = [tokens_palette(cfg.data), (cfg.palette, load_palette(cfg.palette) if cfg.palette else None)]
    n_classes = 0
    if cfg.clf and not cfg.eval_only:  # an evaluated model keeps the classes it was fine-tuned on
        if Y_tr is None:
            raise SystemExit(f"--clf needs labels: {cfg.data}_trY.npy is missing")
        n_classes = int(max(Y_tr.max(), Y_va.max() if Y_va is not None else 0)) + 1
    return X_tr, Y_tr, X_va, Y_va, n_px, palettes, n_classes


class Batches:
    """Global batches of image indices: each epoch a permutation seeded by (seed, epoch), taken in order.
    The position (epoch, cursor) is all the state there is, so a resumed run sees the same batches."""

    def __init__(self, n, batch_size, seed, epoch=0, cursor=0):
        if n < batch_size:
            raise SystemExit(f"the training split has {n} images, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.epoch, self.cursor = n, batch_size, seed, epoch, cursor
        self._order = (None, None)  # (epoch, its permutation): drawn once an epoch

    def next(self):
        if self.cursor + self.batch_size > self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
        if self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.n))
        batch = self._order[1][self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch

    def state(self):
        return {"epoch": self.epoch, "cursor": self.cursor}


def get_micro_batch(X, indices, n_px, flip_mask, shifts, device):
    """Tokens for these images as int64 on the device, rows reversed where flip_mask is set and each image moved by
    its (down, right) shift (see crop); flip_mask and shifts may be None."""
    order = np.argsort(indices)  # sorted reads are kinder to a memory map
    x = np.empty((len(indices), X.shape[1]), dtype=np.int64)
    x[order] = X[indices[order]]
    if flip_mask is not None and flip_mask.any():
        x[flip_mask] = x[flip_mask].reshape(-1, n_px, n_px)[:, :, ::-1].reshape(-1, n_px * n_px)
    if shifts is not None:
        x = crop(x, n_px, shifts)
    return to_device(torch.from_numpy(x), device)


def crop(x, n_px, shifts):
    """Random crops of token images x [B, n_px*n_px]: image b is read from row i - shifts[b, 0] and column
    j - shifts[b, 1], mirrored at the edges (the pixel at -1 is the one at 1), as if cut from a padded image.
    shifts: int [B, 2], each at most n_px - 1 in size."""
    def mirrored(shift):  # [B, n_px]: the source row (or column) of each output one
        i = np.abs(np.arange(n_px)[None] - shift[:, None])
        return np.where(i >= n_px, 2 * (n_px - 1) - i, i)
    rows, cols = mirrored(shifts[:, 0]), mirrored(shifts[:, 1])
    images = x.reshape(-1, n_px, n_px)
    b = np.arange(len(x))[:, None, None]
    return images[b, rows[:, :, None], cols[:, None, :]].reshape(len(x), n_px * n_px)


def to_device(x, device):
    """A host tensor on the device, copied from pinned memory so the copy does not wait for the GPU."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x


def training_masks(config, seed, step, batch_size):
    """The BERT masks of one step's global batch (bool [batch_size, T], True = masked), drawn on the host from
    (seed, step): every process slices the same masks, so a run masks alike on any number of processes and a
    resumed one as it would have."""
    if not config.bert:
        return None
    draw = np.random.default_rng([seed, step, 2]).random((batch_size, config.block_size))
    return torch.from_numpy(draw < config.bert_mask_prob)


# ---- model ----

def build_model(cfg, n_px, n_vocab, n_classes, fits=lambda config: None, resume_config=None):
    """The run's model: when resuming, the one its checkpoint's config describes (the weights are read later;
    the --ckpt file it started from is not needed again); else the --ckpt checkpoint's weights (a .pt or the
    folder of an --fsdp run; its objective with it) or a fresh one from the preset and overrides. n_classes:
    the classifier's, from the data, for a --clf run (a run without --clf drops a checkpoint's classifier;
    --eval_only keeps it). fits(config) runs first, so a model that cannot fit is refused before it is built.
    Returns (model, the checkpoint's palette or None)."""
    if resume_config is not None or not cfg.ckpt:
        config = IGPTConfig(**resume_config) if resume_config is not None else preset_config(cfg, n_px, n_vocab,
                                                                                            n_classes)
        fits(config)
        return IGPT(config), None
    ckpt = parallel.load_weights(cfg.ckpt)
    mask_prob = mask_prob_override(cfg)
    if cfg.eval_only:  # scored as it is: with its own classifier, if it has one
        n_classes = ckpt["config"]["n_classes"]
        if cfg.clf and not n_classes:
            raise SystemExit(f"--eval_only --clf: {cfg.ckpt} has no classifier to score; fine-tune one first "
                             f"(train.py --clf --ckpt {cfg.ckpt}), or drop --clf")
    mconf = IGPTConfig(**{**ckpt["config"], "n_classes": n_classes, **mask_prob})
    if cfg.bert and not mconf.bert:
        raise SystemExit(f"--bert: {cfg.ckpt} is an autoregressive model; a BERT run starts from a BERT "
                         "checkpoint (convert.py --download SIZE --bert) or from scratch")
    if mask_prob and not mconf.bert:
        raise SystemExit(f"--bert_mask_prob is for BERT models, and {cfg.ckpt} is an autoregressive one")
    for k in ("n_layer", "n_embd", "n_head"):
        if getattr(cfg, k) and getattr(cfg, k) != getattr(mconf, k):
            raise SystemExit(f"--{k} {getattr(cfg, k)}: {cfg.ckpt} is a model of {k} {getattr(mconf, k)}, "
                             "which a run from its weights keeps; drop the flag")
    if mconf.n_px != n_px:
        raise SystemExit(f"{cfg.ckpt} is a model of {mconf.n_px}x{mconf.n_px} images but the data has "
                         f"{n_px}x{n_px}")
    fits(mconf)
    model = IGPT(mconf)
    # a new classifier starts from zeros; a model without one leaves the checkpoint's out
    weights = {k: v for k, v in ckpt["model"].items() if k != "clf.weight" or mconf.n_classes}
    mismatch = weights_mismatch(model, weights, optional={"clf.weight"} if cfg.clf else ())
    if mismatch:
        raise SystemExit(f"{cfg.ckpt}: the weights do not fit the model of its config: {mismatch}")
    model.load_state_dict(weights, strict=False)
    return model, ckpt.get("palette")


def mask_prob_override(cfg):
    """The config field --bert_mask_prob sets, when given (> 0): {} leaves the checkpoint's or the default."""
    return {"bert_mask_prob": cfg.bert_mask_prob} if cfg.bert_mask_prob else {}


def preset_config(cfg, n_px, n_vocab, n_classes):
    """The config of --model with the size overrides and the objective."""
    if cfg.model not in PRESETS:
        raise SystemExit(f"--model {cfg.model!r} is not one of {sorted(PRESETS)}")
    mask_prob = mask_prob_override(cfg)
    if mask_prob and not cfg.bert:
        raise SystemExit("--bert_mask_prob is for BERT models: add --bert")
    sizes = {k: getattr(cfg, k) or v for k, v in PRESETS[cfg.model].items()}
    return IGPTConfig(n_px=n_px, n_vocab=n_vocab, n_classes=n_classes if cfg.clf else 0, bert=cfg.bert,
                      **mask_prob, **sizes)


def compute_bytes(cfg):
    """Bytes of a number in the products on a GPU: 2 under bf16 autocast, else 4."""
    return 2 if cfg.dtype == "bfloat16" else 4


def check_memory(cfg, config, world, device):
    """Refuse, before any work, a training run that cannot fit the GPU by parallel.memory_estimate (unless
    --no-memory_check)."""
    if device.type != "cuda" or cfg.eval_only or not cfg.memory_check:
        return
    error = parallel.fit_error(config, torch.cuda.get_device_properties(device).total_memory, cfg.micro_batch_size,
                               world, cfg.fsdp, cfg.activation_checkpointing, compute_bytes(cfg), cfg.batch_size)
    if error:
        raise SystemExit(f"{error} (it is an estimate: --no-memory_check tries the run anyway)")


def dry_run(cfg, world, device, log):
    """--dry_run: the memory per GPU that the run's model needs, with this run's options and number of processes,
    and whether it fits this GPU. The model is the --resume checkpoint's, or --ckpt's, else the preset and
    overrides for the data where they are there (--n_px or the images' size, else 32; the palette's colours, else
    512; with --clf the labels' classes), all read without loading the images. Returns the estimate."""
    source = checkpoint_to_resume(cfg.out) if cfg.resume else cfg.ckpt
    if source:  # only its config is used
        config = IGPTConfig(**parallel.read_state(source)["config"])
    else:
        n_px, images, labels = cfg.n_px, f"{cfg.data}_trX.npy", f"{cfg.data}_trY.npy"
        if not n_px:
            n_px = math.isqrt(load_npy(images, mmap_mode="r").shape[1]) if os.path.isfile(images) else 32
        palette = load_palette(cfg.palette) if cfg.palette else tokens_palette(cfg.data)[1]
        n_classes = int(load_npy(labels).max()) + 1 if cfg.clf and os.path.isfile(labels) else 0
        config = preset_config(cfg, n_px, len(palette) if palette is not None else 512, n_classes)
    setup = (cfg.micro_batch_size, world, cfg.fsdp, cfg.activation_checkpointing)
    estimate = parallel.memory_estimate(config, *setup, compute_bytes(cfg))
    log(parallel.describe(config, estimate, *setup))
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
        error = parallel.fit_error(config, capacity, *setup, compute_bytes(cfg), cfg.batch_size)
        log(error or f"fits {device}'s {capacity / 1e9:.1f} GB")
    if dist.is_initialized():
        dist.destroy_process_group()
    return estimate


class FineTuneLoss(nn.Module):
    """The fine-tuning objective, as in the paper: cross-entropy of the classifier on the mean-pooled final features
    plus gen_weight times the generative loss. One module, so that DDP, which synchronises the gradients of what
    runs through its forward, sees all of it."""

    def __init__(self, model, gen_weight):
        super().__init__()
        self.model, self.gen_weight = model, gen_weight

    def forward(self, tokens, labels, mask=None):
        clf_logits, gen_loss = self.model.classify(tokens, mask)
        return F.cross_entropy(clf_logits, labels) + self.gen_weight * gen_loss


def lr_at(step, cfg):
    """Linear warmup to learning_rate, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def evaluate(model, X, Y, micro_batch_size, autocast, device, rank=0, world=1, max_images=0):
    """Mean generative loss in nats per token over the split (this rank's share, summed over ranks), and the
    classification accuracy when the model has a classifier and labels are given. A BERT model reads each image
    under its fixed_mask, the same in every run, so validation losses compare between runs."""
    model.eval()
    n = len(X) if not max_images else min(max_images, len(X))
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss * images, correct, images
    end = -(-n // (world * micro_batch_size)) * world * micro_batch_size  # as many forwards on every rank
    for start in range(rank * micro_batch_size, end, world * micro_batch_size):
        idx = np.arange(start, min(start + micro_batch_size, n))
        # past the split's end a rank still runs a forward, of one image counted nowhere: under FSDP every
        # forward gathers each block's weights with the other ranks
        read = idx if len(idx) else np.arange(1)
        x = get_micro_batch(X, read, 0, None, None, device)
        mask = to_device(fixed_mask(read, model.config), device) if model.config.bert else None
        with autocast:
            if model.clf is not None and Y is not None:
                clf_logits, loss = model.classify(x, mask)
                y = to_device(torch.from_numpy(np.asarray(Y[idx])), device)
                totals[1] += (clf_logits[:len(idx)].argmax(-1) == y).sum()
            else:
                loss = model(x, mask=mask)[1]
        totals[0] += loss.double() * len(idx)
        totals[2] += len(idx)
    if world > 1:
        dist.all_reduce(totals)
    model.train()
    loss, correct, count = totals.tolist()
    return loss / count, (correct / count if model.clf is not None and Y is not None else None)


def micro_batch(cfg, world):
    """Images per forward pass: --micro_batch_size, or when it is 0 the largest divisor of each process's share of
    the batch up to MICRO_BATCH."""
    if cfg.batch_size <= 0 or cfg.batch_size % world:
        raise SystemExit(f"--batch_size {cfg.batch_size} must be a positive multiple of the {world} processes")
    share = cfg.batch_size // world
    micro = cfg.micro_batch_size or max(d for d in range(1, min(share, MICRO_BATCH) + 1) if share % d == 0)
    if micro <= 0 or share % micro:
        raise SystemExit(f"--batch_size {cfg.batch_size} must be a multiple of --micro_batch_size {micro} x "
                         f"{world} processes (or leave --micro_batch_size at 0 to have it chosen)")
    return micro


def resumed_config(cfg, given, resume_state, ckpt_path):
    """The TrainConfig a --resume continues with: the checkpoint's, with the options given now that may change
    (such as --max_steps or --learning_rate); one that would change the model, the data or the order of the
    batches (RUN_DEFINING) is refused."""
    missing = [k for k in ("train_config", "step", "data_position", "rng") if k not in resume_state]
    if missing:
        raise SystemExit(f"{ckpt_path} holds a model but no training state (no {', '.join(missing)}): start a new run "
                         f"from its weights with --ckpt {ckpt_path} and another --out")
    saved = {RENAMED.get(k, k): v for k, v in resume_state["train_config"].items()}
    unknown = sorted(set(saved) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise SystemExit(f"{ckpt_path} was trained with options this train.py does not know ({unknown}): resume it "
                         "with the version that wrote it")
    for name in sorted(given & set(RUN_DEFINING)):
        if name in saved and getattr(cfg, name) != saved[name]:
            raise SystemExit(f"--resume continues the run of {ckpt_path} with its own --{name} {saved[name]!r}; "
                             f"--{name} {getattr(cfg, name)!r} would change it: drop the flag, or start a new run "
                             f"(another --out, with --ckpt {ckpt_path} to start from its weights)")
    return TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in given}, "resume": True})


def checkpoint_to_resume(out):
    """The checkpoint --resume continues in the folder out: ckpt.pt, or the folder ckpt.dcp of an --fsdp run."""
    path = parallel.find_checkpoint(out)
    if path is None:
        raise SystemExit(f"--resume: no checkpoint in {out} (ckpt.pt, or ckpt.dcp from --fsdp)")
    return path


def open_run(cfg, given, log_path):
    """The run's folder as the options find it: (cfg, resume_state, resume_path). With --resume, the checkpoint's
    state and the options it continues under (resumed_config); without, the path of a checkpoint already there
    (None if none), which only --force or --eval_only may pass over."""
    resume_state, resume_path = None, parallel.find_checkpoint(cfg.out)  # ckpt.pt, or the folder ckpt.dcp
    if cfg.resume:
        resume_path = checkpoint_to_resume(cfg.out)
        sharded = os.path.isdir(resume_path)  # its weights and optimizer state are read once the model is sharded
        resume_state = parallel.read_state(resume_path)
        cfg = resumed_config(cfg, given, resume_state, resume_path)
        if sharded != cfg.fsdp:
            raise SystemExit(f"{resume_path} was written {'with' if sharded else 'without'} --fsdp: resume it so "
                             "(or start a new run from its weights with --ckpt)")
    elif not cfg.eval_only and not cfg.force and (resume_path is not None or os.path.exists(log_path)):
        raise SystemExit(f"{cfg.out} holds a run ({resume_path or log_path}): pass --resume to continue it, or "
                         "--force to start over (the old checkpoint is replaced only when the new run writes its "
                         "first one)")
    return cfg, resume_state, resume_path


def kept_log_lines(log_path, step):
    """The lines of log.jsonl up to `step` (a resumed run drops those of the steps its checkpoint did not keep,
    and a line cut short by a kill)."""
    keep = []
    for line in open(log_path) if os.path.exists(log_path) else []:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            pass
    return keep


def duration(seconds):
    """35ms, 4.2s, 3m05s, 2h07m or 3d04h."""
    if seconds < 1:
        return f"{1000 * seconds:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, h = int(seconds // 60), int(seconds // 3600)
    return f"{m}m{int(seconds) % 60:02d}s" if h == 0 else f"{h}h{m % 60:02d}m" if h < 48 else f"{h // 24}d{h % 24:02d}h"


class StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM ask the run to stop after its current step: the handler only notes the signal
    (a second one stops at once, as a plain Ctrl-C). Each step the processes agree on it, and on whether a
    checkpoint is due by the clock, through one all_reduce over a CPU (gloo) group, so every rank stops at the
    same step and no step waits for the GPU."""

    def __init__(self, world):
        self.signal = 0
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        for s in (signal.SIGINT, signal.SIGTERM):  # common.script puts the previous handlers back
            signal.signal(s, self.note)

    def note(self, signum, frame):
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signum

    def _largest(self, *values):
        """Each of the integers values, the largest any process holds."""
        flags = torch.tensor(values)
        if self.group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return flags.tolist()

    def any(self, flag):
        """Whether any process's flag is set."""
        return bool(self._largest(int(flag))[0])

    def agree(self, checkpoint_due):
        """(the signal any process received, or 0; whether any process's clock says a checkpoint is due)"""
        signum, due = self._largest(self.signal, int(checkpoint_due))
        return signum, bool(due)


def leave_together():
    """The end of a run under torchrun: every rank waits for the others (rank 0 may still be writing the last
    checkpoint), then the process group closes, so that no rank's exit finds a peer's connection gone."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---- the run ----

def setup_distributed(cfg):
    """(rank, world, device) under torchrun, else a single process (parallel.shard gives it a group of one under
    --fsdp)."""
    if "RANK" in os.environ:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), \
            int(os.environ["WORLD_SIZE"])
        use_cuda = torch.cuda.is_available() and cfg.device != "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return rank, world, device
    return 0, 1, resolve_device(cfg.device)


@script
def main(argv=None):
    """Train (or evaluate) as argv says; returns the last evaluation's figures. Float32 products on the GPU run in
    TF32 while it runs, and as they were after: pipeline.py runs the scripts one after another in one process."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        return run(argv)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def run(argv):
    """main's work: the run of argv's options, from its checkpoint when resuming, to its last evaluation."""
    cfg, given = parse_config(argv)
    check_ranges(cfg, given)
    rank, world, device = setup_distributed(cfg)
    set_threads(cfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    log_path = os.path.join(cfg.out, "log.jsonl")
    if cfg.dry_run:
        cfg.micro_batch_size = micro_batch(cfg, world)
        return dry_run(cfg, world, device, log)

    cfg, resume_state, resume_path = open_run(cfg, given, log_path)
    ckpt_path = os.path.join(cfg.out, "ckpt.dcp" if cfg.fsdp else "ckpt.pt")
    if not cfg.eval_only:
        cfg.micro_batch_size = micro_batch(cfg, world)

    X_tr, Y_tr, X_va, Y_va, n_px, palettes, n_classes = load_data(cfg)
    palette = one_palette(*palettes)
    n_vocab = len(palette) if palette is not None else 512

    # model
    torch.manual_seed(cfg.seed)
    if cfg.eval_only and resume_state is not None:  # the run's own weights, not those it started from
        cfg.ckpt = resume_path
    elif cfg.eval_only and not cfg.ckpt:
        raise SystemExit("--eval_only needs --ckpt CHECKPOINT (or --resume)")
    model, ckpt_palette = build_model(cfg, n_px, n_vocab, n_classes, lambda c: check_memory(cfg, c, world, device),
                                      resume_state["config"] if resume_state is not None and not cfg.eval_only
                                      else None)
    # the tokens mean the colours of the palette they were made with: the data's, --palette's, the checkpoints'
    n_vocab = model.config.n_vocab
    palette = one_palette(*palettes, (cfg.ckpt, ckpt_palette),
                          (resume_path, resume_state.get("palette") if resume_state else None), n_vocab=n_vocab)
    for name, X in [(f"{cfg.data}_trX.npy", X_tr), (f"{cfg.data}_{cfg.eval_split}X.npy", X_va)]:
        if X is not None:
            check_tokens(X, name, n_vocab, model.config.block_size)
    if resume_state is not None and not cfg.eval_only:
        if resume_state.get("train_images", len(X_tr)) != len(X_tr):
            raise SystemExit(f"{cfg.data}_trX.npy holds {len(X_tr)} images but the run of {resume_path} trained on "
                             f"{resume_state['train_images']}: the data changed, so the run cannot go on exactly")
        if not cfg.fsdp:  # a sharded run's weights are read into the shards, below
            mismatch = weights_mismatch(model, resume_state["model"])
            if mismatch:
                raise SystemExit(f"{resume_path} does not fit the model of its options: {mismatch}")
            model.load_state_dict(resume_state["model"])
    if not cfg.fsdp or cfg.eval_only:  # parallel.shard moves each block to the GPU as it shards it
        model.to(device)
    log(f"model: {model.get_num_params():,} parameters, {model.config}")

    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    autocast = torch.autocast("cuda", dtype=amp_dtype) if use_cuda and amp_dtype != torch.float32 else nullcontext()
    do_compile = switch(cfg.compile, device)
    if cfg.eval_only:
        loss, acc = evaluate(model, X_va, Y_va, cfg.micro_batch_size or MICRO_BATCH, autocast, device, rank, world,
                             cfg.eval_images)
        per = "masked token (fixed masks)" if model.config.bert else "token"
        log(f"{cfg.eval_split} loss {loss:.4f} nats per {per}" + (f", accuracy {acc:.4f}" if acc is not None else ""))
        if world > 1:  # evaluate's all_reduce already brought the ranks together
            dist.destroy_process_group()
        return {"loss": loss, "accuracy": acc}

    accum = cfg.batch_size // (cfg.micro_batch_size * world)
    raw_model = model
    if cfg.activation_checkpointing:
        parallel.checkpoint_blocks(raw_model)
    if cfg.fsdp:
        parallel.shard(raw_model, device, amp_dtype if use_cuda else None, compile=do_compile)
    optimizer = raw_model.configure_optimizers(cfg.learning_rate, (cfg.beta1, cfg.beta2), cfg.weight_decay,
                                               device.type)  # after shard(), which makes the parameters DTensors
    step, batches, saved_step = 0, Batches(len(X_tr), cfg.batch_size, cfg.seed), None
    if resume_state is not None:
        # Adam's moments come from the checkpoint, its betas and weight decay from this call's options
        options = [{k: group[k] for k in ("betas", "weight_decay")} for group in optimizer.param_groups]
        if cfg.fsdp:
            parallel.load_sharded(resume_path, raw_model, optimizer)
        else:
            optimizer.load_state_dict(resume_state["optimizer"])
        for group, given_now in zip(optimizer.param_groups, options):
            group.update(given_now)
        step = saved_step = resume_state["step"]
        batches = Batches(len(X_tr), cfg.batch_size, cfg.seed, **resume_state["data_position"])
        torch.set_rng_state(resume_state["rng"]["cpu"])
        if use_cuda and "cuda" in resume_state["rng"]:
            torch.cuda.set_rng_state(resume_state["rng"]["cuda"])
        log(f"resumed from {resume_path} at step {step}")
        if step >= cfg.max_steps:
            log(f"{resume_path} is at step {step}, the run's --max_steps {cfg.max_steps}: nothing to train; give a "
                "larger --max_steps to train on")
            leave_together()
            return {"step": step, f"{cfg.eval_split}_loss": None, "accuracy": None}

    if cfg.clf:
        model = FineTuneLoss(model, cfg.gen_weight)
    if do_compile and not cfg.fsdp:  # under FSDP each block is compiled on its own
        model = torch.compile(model)
    ddp = world > 1 and not cfg.fsdp
    if ddp:
        model = parallel.replicate(model, device)

    # A run started over with --force keeps its records here until its first checkpoint replaces the old run's, so
    # the folder never holds one run's checkpoint beside another's log (which --resume would continue).
    pending = [] if resume_state is None and resume_path is not None else None

    def rewrite_log(lines):
        atomic_write(log_path, lambda f: f.writelines(line.encode() for line in lines))

    if master and pending is None:
        rewrite_log(kept_log_lines(log_path, step) if resume_state is not None else [])

    def write_log(record):
        if pending is not None:
            pending.append(json.dumps(record) + "\n")
        elif master:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    stop = StopSignal(world)

    def save(step):
        """Write the checkpoint: every rank checks its weights (under FSDP, its shards) and the ranks agree, so all
        stop together if they diverged; rank 0 writes the file, or every rank its shards."""
        bad = first_nonfinite({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict()})
        if stop.any(bad is not None) and bad is None:
            bad = "another process's weights"
        if bad is not None:
            diverged(f"{bad} holds inf or nan after step {step}")
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if use_cuda else {})}
        state = dict(step=step, data_position=batches.state(), rng=rng, train_config=asdict(cfg),
                     train_images=len(X_tr))
        if cfg.fsdp:
            parallel.save_sharded(ckpt_path, raw_model, optimizer, palette=palette, **state)
        elif master:
            save_checkpoint(ckpt_path, raw_model, palette=palette, optimizer=optimizer.state_dict(), **state)
        nonlocal pending
        if pending is not None:  # this run's checkpoint now stands in the old one's place: so does its log
            if master:
                rewrite_log(pending)
            pending = None
        other = os.path.join(cfg.out, "ckpt.pt" if cfg.fsdp else "ckpt.dcp")
        if master and os.path.isdir(other):  # the checkpoint of the run this one started over with --force
            shutil.rmtree(other)
        elif master and os.path.exists(other):
            os.remove(other)
        return step

    def diverged(what):
        raise SystemExit(f"{what}; stopping, and nothing from that step on is saved. " + (
            f"The last good checkpoint is {ckpt_path} (step {saved_step}): resume it with a lower --learning_rate "
            "or a smaller --grad_clip" if saved_step is not None else "No checkpoint was written: start again with "
            "a lower --learning_rate or a smaller --grad_clip"))

    log(f"training on {len(X_tr)} images, {world} process(es), {accum} micro-batch(es) of {cfg.micro_batch_size} "
        f"per step, {device}, compile={do_compile}, flips={cfg.flip}, crops={cfg.crop}")
    model.train()
    t0, steps_since, first_step = time.time(), 0, step + 1
    last_save = time.time()
    first_bad, bad_loss = torch.zeros((), dtype=torch.long, device=device), torch.zeros((), device=device)
    val_loss = acc = None
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = batches.next()
        flips = np.random.default_rng([cfg.seed, step, 1]).random(cfg.batch_size) < 0.5 if cfg.flip else None
        shifts = (np.random.default_rng([cfg.seed, step, 3]).integers(-cfg.crop, cfg.crop + 1, (cfg.batch_size, 2))
                  if cfg.crop else None)
        masks = training_masks(raw_model.config, cfg.seed, step, cfg.batch_size)
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            part = slice((micro * world + rank) * cfg.micro_batch_size,
                         (micro * world + rank + 1) * cfg.micro_batch_size)
            x = get_micro_batch(X_tr, indices[part], n_px, None if flips is None else flips[part],
                                None if shifts is None else shifts[part], device)
            mask = None if masks is None else to_device(masks[part], device)
            # DDP reduces the gradients once, after the last micro-batch; FSDP after each, into the shards
            sync = micro == accum - 1 or world == 1 or cfg.fsdp
            with (nullcontext() if sync else model.no_sync()), autocast:
                if cfg.clf:
                    loss = model(x, to_device(torch.from_numpy(np.asarray(Y_tr[indices[part]])), device), mask)
                else:
                    loss = model(x, mask=mask)[1]
                (loss / accum).backward()
            step_loss += loss.detach() / accum
        if world > 1:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        # Remember the first step whose loss was not finite, on the device: reading the loss on the host every step
        # would make the CPU wait for the GPU instead of queueing the next step. It is read before each log line
        # and each checkpoint, so weights touched by a bad step are never saved.
        newly_bad = (first_bad == 0) & ~torch.isfinite(step_loss)
        first_bad, bad_loss = torch.where(newly_bad, step + 1, first_bad), torch.where(newly_bad, step_loss, bad_loss)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=not ddp)  # DDP's gradients are views into its buckets: zeroed in place
        step += 1
        steps_since += 1

        stopped, clock_due = stop.agree(cfg.ckpt_minutes > 0 and time.time() - last_save > 60 * cfg.ckpt_minutes)
        log_now = step % cfg.log_interval == 0 or step in (first_step, cfg.max_steps)
        eval_now = step % cfg.eval_interval == 0 or step == cfg.max_steps
        save_now = eval_now or stopped or clock_due or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0)
        if (log_now or save_now) and first_bad.item():
            diverged(f"step {first_bad.item()}: the loss is {bad_loss.item()}")
        if log_now:
            loss_value, dt = step_loss.item(), time.time() - t0
            ips, per_step = steps_since * cfg.batch_size / dt, dt / steps_since
            record = {"step": step, "loss": loss_value, "lr": lr, "images_per_s": ips, "s_per_step": per_step,
                      "mfu": raw_model.estimate_mfu(ips / world) if use_cuda else None, "time": time.time(),
                      "max_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if use_cuda else None}
            if step == first_step < cfg.max_steps:  # its time holds the warm-up, which predicts nothing
                warmed = "compiled and warmed up" if do_compile else "warmed up"
                to_go = f"the time to go from the next line (this step {warmed})"
            else:
                to_go = f"{duration(per_step * (cfg.max_steps - step))} to go"
            log(f"step {step}/{cfg.max_steps}: loss {loss_value:.4f}, lr {lr:.2e}, {ips:.0f} images/s, "
                f"{duration(per_step)} a step"
                + (f", mfu {100 * record['mfu']:.1f}%, {record['max_memory_gb']:.1f} GB" if use_cuda else "")
                + f", {to_go}", flush=True)
            write_log(record)
            t0, steps_since = time.time(), 0
        if eval_now:
            val_loss, acc = evaluate(raw_model, X_va, Y_va, cfg.micro_batch_size, autocast, device, rank, world,
                                     cfg.eval_images)
            log(f"step {step}: {cfg.eval_split} loss {val_loss:.4f}"
                + (f", accuracy {acc:.4f}" if acc is not None else ""))
            write_log({"step": step, f"{cfg.eval_split}_loss": val_loss,
                       **({"accuracy": acc} if acc is not None else {})})
        if save_now:
            saved_step, last_save = save(step), time.time()
            t0, steps_since = time.time(), 0
        if stopped:
            if master:
                launcher = "torchrun ... " if world > 1 else "python "
                print(f"train.py: stopped by {signal.Signals(stopped).name} after step {step} and wrote "
                      f"{ckpt_path}; continue with: {launcher}train.py --resume --out {cfg.out}", file=sys.stderr)
            leave_together()
            raise SystemExit(128 + stopped)
    leave_together()
    return {"step": step, f"{cfg.eval_split}_loss": val_loss, "accuracy": acc}


if __name__ == "__main__":
    main(sys.argv[1:])
