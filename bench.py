"""
Benchmarks. Each is a function registered with @benchmark; run them on a GPU:

    python bench.py train sample               # some
    python bench.py all --out results          # every one, each kept as results/NAME_DEVICE.json

Every benchmark prints its figures and returns them as a dict; with --out each lands in OUT/NAME_DEVICE.json
(e.g. results/sample_h200.json, results/ddp_scaling_s_8xh200.json) as soon as it finishes. Timings are
wall-clock with the GPU synchronised around each run, after warm-up; medians are reported.

The training benchmarks of parallel.py and of many GPUs (memory_*, ddp_scaling_*, fsdp_*, multi_gpu_resume) run
train.py itself, under `torch.distributed.run --standalone --nproc_per_node=N`, with NVLink multicast off in
every process they start (MULTICAST_OFF in its environment). The multi-GPU ones train on 1, 2, 4 and 8 GPUs, as
many as the host has (IGPT_BENCH_GPUS=2,8 picks some), and skip a host with one:

    python bench.py ddp_scaling_s ddp_scaling_m fsdp_scaling_m fsdp_scaling_l fsdp_xl multi_gpu_resume --out results
    IGPT_BENCH_SMALL=1 python bench.py ddp_scaling_s multi_gpu_resume    # CPU smoke run: 2 processes, gloo
"""
import argparse
import contextlib
import copy
import functools
import glob
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

BENCHMARKS = {}


def benchmark(fn):
    BENCHMARKS[fn.__name__] = fn
    return fn


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _small():
    """IGPT_BENCH_SMALL=1: the benchmarks' CPU smoke runs, on shrunk models and data."""
    return os.environ.get("IGPT_BENCH_SMALL") == "1"


def timeit(fn, warmup=1, repeat=5):
    """Median seconds of fn() over `repeat` runs after `warmup` runs, synchronising the GPU around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def relative_error(x, ref):
    """||x - ref|| / ||ref||, in float64."""
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def device_slug(gpus=1):
    """A short name for result files: the GPU's model ("NVIDIA H200" -> h200), with their number when a benchmark
    used several (8xh200), or cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    name = device_name().replace("NVIDIA", "")
    found = re.search(r"\b([A-Za-z]+\d+\w*)\b", name)
    model = found.group(1).lower() if found else re.sub(r"\W+", "-", name.strip()).lower()
    return f"{gpus}x{model}" if gpus > 1 else model


@benchmark
def precision():
    """iGPT-S on the GPU: logits under bf16 autocast and torch.compile against fp32 eager (target relative error
    < 1e-2), and of the model cast to bf16 with and without the MLP's fused product (engine.fuse_mlp); and the
    fused decode step (engine.fused_decode) against the full forward at every one of the 1024 positions, in fp32
    (TF32 off)."""
    import igpt
    from engine import fuse_mlp, fused_decode
    torch.manual_seed(0)
    model = igpt.IGPT(igpt.IGPTConfig.preset("s")).cuda().eval()
    torch.nn.init.normal_(model.wtet.weight, std=0.02)
    x = torch.randint(0, 512, (8, 1024), device="cuda")
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    with torch.no_grad():
        ref = model(x)[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast = torch.compile(model)(x)[0]
        rel = relative_error(fast, ref)
        model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
        rel_bf16_plain = relative_error(model_bf16(x)[0], ref)
        rel_bf16 = relative_error(fuse_mlp(model_bf16)(x)[0], ref)
        c = model.config
        caches = [igpt.KVCache(len(x), c.n_head, c.block_size, c.n_embd // c.n_head, torch.float32, "cuda")
                  for _ in model.h]
        positions = torch.arange(1024, device="cuda")
        cached = [fused_decode(model, caches, model.embed_next(x[:, max(i - 1, 0)], pos)[:, 0], pos).float()
                  for i in range(1024) for pos in [positions[i:i + 1]]]
        cached = torch.stack(cached, 1).double()
        rel_cached = relative_error(cached, ref)
        max_cached = ((cached - ref.double()).abs().max() / ref.double().abs().max()).item()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    print(f"iGPT-S logits, bf16 autocast + compile vs fp32 eager: relative error {rel:.2e}; "
          f"bf16 model vs fp32: {rel_bf16:.2e} with the fused MLP product, {rel_bf16_plain:.2e} without")
    print(f"iGPT-S logits, fused decode steps vs full forward (fp32, all 1024 positions): relative error "
          f"{rel_cached:.2e}, largest difference {max_cached:.2e} of the largest logit")
    return {"relative_error_bf16_compiled": rel, "relative_error_bf16_model": rel_bf16,
            "relative_error_bf16_model_unfused": rel_bf16_plain,
            "relative_error_cached_fp32": rel_cached,
            "max_error_cached_fp32": max_cached}


# ---- palette.py: palette fit and encoding ----

QUANTIZE_IMAGES = {}  # decoded once for both benchmarks


def cifar_images():
    """The 60,000 CIFAR-10 images of the JPEG zip at $IGPT_CIFAR_ZIP (its train/ and test/ folders); without it,
    60,000 of uniformly random pixels, a worst case in which nearly every colour of the cube occurs.
    $IGPT_BENCH_IMAGES keeps only that many (for a quick run on the CPU)."""
    import numpy as np

    from data import load_images
    if "images" not in QUANTIZE_IMAGES:
        path = os.environ.get("IGPT_CIFAR_ZIP", "data/cifar10-jpeg.zip")
        count = int(os.environ.get("IGPT_BENCH_IMAGES", 60000))
        if os.path.exists(path):
            images = np.concatenate([load_images(f"{path}:{s}", 32)[0] for s in ("train", "test")])[:count]
        else:
            print(f"warning: {path} not found (set IGPT_CIFAR_ZIP); using {count} images of random pixels instead")
            images = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        QUANTIZE_IMAGES["images"] = images
    return QUANTIZE_IMAGES["images"]


@benchmark
def kmeans():
    """Fit 512 colours on every pixel (timed), and scikit-learn's MiniBatchKMeans on the same pixels beside it: one
    pass over all of them in batches of 65,536. (Its steps draw each batch with a cumulative sum over all 61M
    sample weights, so one pass takes about 16 minutes on two CPU cores, and it is the slow part of this run.)
    Both are scored by the mean squared error of every pixel to its nearest colour."""
    import numpy as np
    from sklearn.cluster import MiniBatchKMeans

    from palette import fit_palette, palette_mse
    images = cifar_images()
    pixels = images.reshape(-1, 3)
    distinct = np.count_nonzero(np.bincount(pixels.astype(np.int32) @ np.array([65536, 256, 1], np.int32),
                                            minlength=1 << 24))
    print(f"{len(images)} images, {len(pixels)} pixels, {distinct} distinct colours", flush=True)
    fitted = {}
    seconds = timeit(lambda: fitted.update(palette=fit_palette(images, 512, progress=False)), warmup=1, repeat=3)
    mse = palette_mse(images, fitted["palette"])
    print(f"{'':36}{'seconds':>9}{'mse/pixel':>12}")
    print(f"{'fit_palette on ' + device_name():36}{seconds:9.2f}{mse:12.6f}", flush=True)
    t0 = time.perf_counter()
    sk = MiniBatchKMeans(n_clusters=512, random_state=0, n_init=1, batch_size=65536, max_iter=1,
                         compute_labels=False)
    sk.fit(pixels.astype(np.float32) / 127.5 - 1)
    sk_seconds = time.perf_counter() - t0
    sk_mse = palette_mse(images, sk.cluster_centers_.astype(np.float32))
    print(f"{'MiniBatchKMeans(batch_size=65536)':36}{sk_seconds:9.2f}{sk_mse:12.6f} ({sk.n_steps_} steps)")
    return dict(images=len(images), pixels=len(pixels), distinct_colours=int(distinct), seconds=seconds, mse=mse,
                sklearn_seconds=sk_seconds, sklearn_mse=sk_mse, sklearn_steps=int(sk.n_steps_))


@benchmark
def encode():
    """Encode every image with a 512-colour palette (fitted on the first 5,000 images), timed."""
    from palette import encode as encode_images, fit_palette
    images = cifar_images()
    palette = fit_palette(images[:5000], 512, progress=False)
    seconds = timeit(lambda: encode_images(images, palette), warmup=1, repeat=5)
    print(f"encode {len(images)} images on {device_name()}: {seconds:.3f}s, {len(images) / seconds:,.0f} images/s")
    return dict(images=len(images), seconds=seconds, images_per_second=len(images) / seconds)

# ---- probe.py: features and logistic regression ----

@benchmark
def probe_features():
    """probe.py's extraction: 60,000 random token images through iGPT-S (random init), all 24 layers in one pass,
    bf16 with the feature pass compiled on the GPU; target under 30 s on an H100. The features of the first
    images and of the last, part of a padded batch, are checked against model.features of a float32 copy called
    directly (no bf16, no compile, no batching, no host copies). IGPT_BENCH_SMALL=1: 2 layers, 8x8 images, 512 of
    them, for a CPU smoke run."""
    import numpy as np
    from igpt import IGPT, IGPTConfig
    from probe import extract_features
    from common import default_device
    small = _small()
    torch.manual_seed(0)
    config = IGPTConfig.preset("s", **(dict(n_layer=2, n_px=8) if small else {}))
    model = IGPT(config)  # every block's weights are random normal; features never read the zero-initialised head
    n, batch_size, device = 512 if small else 60_000, 256, default_device()
    reference = copy.deepcopy(model).to(device)
    X = np.random.default_rng(0).integers(0, config.n_vocab, (n, config.block_size), dtype=np.uint16)
    layers = list(range(1, config.n_layer + 1))
    kw = dict(batch_size=batch_size, device=device, compile=device == "cuda")
    t0 = time.perf_counter()
    extract_features(model, X[:batch_size], layers, **kw)  # warm-up: compile
    compile_s = time.perf_counter() - t0
    sync()
    t0 = time.perf_counter()
    feats = extract_features(model, X, layers, **kw)
    seconds = time.perf_counter() - t0
    assert feats.std(0).min() > 0, "degenerate features"
    rows = np.r_[0:100, n - 100:n]
    plain = reference.features(torch.from_numpy(X[rows].astype(np.int64)).to(device), layers).cpu()
    rel = relative_error(feats[rows], plain)
    assert rel < 1e-2, f"extracted features differ from the plain float32 pass by {rel:.2e}"
    print(f"{n} images x {len(layers)} layers of iGPT-{'S' if not small else 'S/2 layers'}: {seconds:.1f} s, "
          f"{n / seconds:.0f} images/s (MFU {100 * model.estimate_mfu(n / seconds) / 3:.0f}% of the forward), "
          f"compile + warm-up {compile_s:.0f} s; relative difference to the plain float32 pass {rel:.1e}",
          flush=True)
    return {"images": n, "layers": len(layers), "seconds": seconds, "images_per_s": n / seconds,
            "compile_s": compile_s, "relative_difference_fp32": rel}


@benchmark
def linear_gelu():
    """The MLP's first product in 16-bit inference, at the shape of iGPT-S's c_fc in probe_features (262,144 rows,
    512 -> 2048): igpt.linear_gelu (the activation in the product's epilogue) against cuBLAS's product followed by
    the compiled activation, and cuBLAS's product alone: milliseconds a call (50 calls in a row, median of 5)."""
    import torch.nn.functional as F
    import igpt
    import kernels
    torch.manual_seed(0)
    x = torch.randn(262_144, 512, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(2048, 512, device="cuda") * 512 ** -0.5).bfloat16()
    unfused = torch.compile(lambda x, w: igpt.activation(F.linear(x, w)))
    ref = igpt.activation(F.linear(x.float(), w.float()))
    out = {}
    candidates = {"linear_gelu": kernels.linear_gelu, "cublas_then_activation": unfused,
                  "cublas_product_only": F.linear}
    for name, fn in candidates.items():
        rel = relative_error(fn(x, w), ref) if name != "cublas_product_only" else None
        def fifty_calls():  # each output dropped as the next is made: one lives at a time, as in a forward
            for _ in range(50):
                fn(x, w)
        out[name] = {"ms": timeit(fifty_calls, warmup=2, repeat=5) / 50 * 1e3,
                     "relative_error_fp32": rel}
        print(f"{name}: {out[name]['ms']:.3f} ms" + (f", relative error to fp32 {rel:.1e}" if rel else ""),
              flush=True)
    return out


@benchmark
def probe_fit():
    """probe.py's logistic regression against scikit-learn's lbfgs at the same C: 50,000 x 512 synthetic features
    (10 class means plus correlated noise, ~80% accuracy), 10,000 test; target under 5 s and 20x faster on the
    GPU. IGPT_BENCH_SMALL=1: 5,000 x 64."""
    from sklearn.linear_model import LogisticRegression
    from probe import accuracy, fit_logistic, standardise
    from common import default_device
    small = _small()
    n, d, k, C = (5_000, 64, 10, 0.01) if small else (50_000, 512, 10, 0.01)
    g = torch.Generator().manual_seed(0)
    means, mix = torch.randn(k, d, generator=g) * 2.6 / d ** 0.5, torch.randn(16, d, generator=g)

    def draw(m):
        y = torch.randint(k, (m,), generator=g)
        return means[y] + torch.randn(m, d, generator=g) + torch.randn(m, 16, generator=g) @ mix, y

    (X, y), (X_test, y_test) = draw(n), draw(10_000)
    X, X_test = standardise(X, X_test)
    device = default_device()
    Xd, yd, Xd_test, yd_test = (t.to(device) for t in (X, y, X_test, y_test))
    ours_s = timeit(lambda: fit_logistic(Xd, yd, C, device=device), warmup=1, repeat=3)
    ours_acc = accuracy(*fit_logistic(Xd, yd, C, device=device), Xd_test, yd_test)
    t0 = time.perf_counter()
    ref = LogisticRegression(C=C, max_iter=10_000).fit(X.numpy(), y.numpy())  # default tol=1e-4, as ours
    sk_s = time.perf_counter() - t0
    sk_acc = ref.score(X_test.numpy(), y_test.numpy())
    print(f"{n} x {d}, {k} classes, C={C}: ours {ours_s:.2f} s on {device}, test acc {100 * ours_acc:.2f}%; "
          f"scikit-learn lbfgs {sk_s:.2f} s ({ref.n_iter_[0]} iterations), test acc {100 * sk_acc:.2f}%; "
          f"{sk_s / ours_s:.0f}x", flush=True)
    return {"n": n, "d": d, "ours_s": ours_s, "ours_test_acc": ours_acc, "sklearn_s": sk_s,
            "sklearn_test_acc": sk_acc, "speedup": sk_s / ours_s}


# ---- igpt.py's checkpoint format: what its checks cost ----

@benchmark
def checkpoint():
    """save_checkpoint and load_checkpoint (the crc32 of every tensor and of the file, the check that every tensor
    is finite) against the same atomic write and a torch.load without them, for a training checkpoint of iGPT-S
    with its Adam state (0.9 GB), from and to the page cache (CPU-bound: it measures the host, not the GPU).
    IGPT_BENCH_SMALL=1: 2 layers."""
    from dataclasses import asdict

    import igpt
    from common import atomic_write
    small = _small()
    model = igpt.IGPT(igpt.IGPTConfig.preset("s", **({"n_layer": 2} if small else {})))
    optimizer = model.configure_optimizers(1e-3)
    model(torch.randint(0, 512, (1, 1024)))[1].backward()
    optimizer.step()  # so that the Adam state exists
    extra = {"optimizer": optimizer.state_dict(), "step": 1}
    with tempfile.TemporaryDirectory() as tmp:
        checked, plain = os.path.join(tmp, "checked.pt"), os.path.join(tmp, "plain.pt")
        obj = {"config": asdict(model.config), "model": model.state_dict(), **extra}
        out = {"save_plain_s": timeit(lambda: atomic_write(plain, lambda f: torch.save(obj, f)), repeat=3),
               "save_checked_s": timeit(lambda: igpt.save_checkpoint(checked, model, **extra), repeat=3),
               "load_plain_s": timeit(lambda: torch.load(plain, weights_only=True), repeat=3),
               "load_checked_s": timeit(lambda: igpt.load_checkpoint(checked), repeat=3),
               "GB": os.path.getsize(checked) / 1e9}
    print(f"{out['GB']:.2f} GB: save {out['save_plain_s']:.2f} s plain, {out['save_checked_s']:.2f} s with the "
          f"checksums; load {out['load_plain_s']:.2f} s plain, {out['load_checked_s']:.2f} s verified", flush=True)
    return out


# ---- train.py: training throughput and MFU ----

def _random_token_files(folder, n_images, n_px=32, n_vocab=512):
    import numpy as np
    rng = np.random.default_rng(0)
    prefix = os.path.join(folder, "random")
    for split in ("tr", "va"):
        np.save(f"{prefix}_{split}X.npy", rng.integers(0, n_vocab, (n_images, n_px * n_px), dtype=np.uint16))
    return prefix


def _train_py_throughput(size, micro_batch_size, batch_size, steps=60, n_px=32, extra=()):
    """Run train.py itself on random tokens and read images/s and MFU from its log (after compile warm-up; the MFU
    is None on the CPU). extra: more train.py flags."""
    import train
    with tempfile.TemporaryDirectory() as tmp:
        prefix = _random_token_files(tmp, 4 * batch_size, n_px)
        out = os.path.join(tmp, "out")
        train.main(["--data", prefix, "--out", out, "--model", size, "--batch_size", str(batch_size),
                    "--micro_batch_size", str(micro_batch_size), "--max_steps", str(steps), "--warmup_steps", "10",
                    "--log_interval", "10", "--eval_interval", str(10 * steps), "--eval_images", "64", *extra])
        records = _log_records(out)
    timed = [r for r in records if "images_per_s" in r and r["step"] > 20]  # skip compile and warm-up
    mfu = statistics.median(r["mfu"] for r in timed) if timed[0]["mfu"] is not None else None
    return statistics.median(r["images_per_s"] for r in timed), mfu


def _hf_train_throughput(size, micro_batch_size, steps=12):
    """Hugging Face transformers' ImageGPT, same sizes, bf16 autocast and fused AdamW, its default attention."""
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling
    from igpt import PRESETS
    p = PRESETS[size]
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(vocab_size=513, n_positions=1024, n_embd=p["n_embd"],
                                                          n_layer=p["n_layer"], n_head=p["n_head"])).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    x = torch.randint(0, 512, (micro_batch_size, 1024), device="cuda")
    inputs = torch.cat([torch.full_like(x[:, :1], 512), x[:, :-1]], 1)  # SOS id first, as HF expects

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(inputs).logits
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timeit(step, warmup=3, repeat=steps)
    del model, opt
    torch.cuda.empty_cache()
    return micro_batch_size / seconds


@benchmark
def train():
    """train.py's images/s and MFU for iGPT-S and -M, beside transformers' ImageGPT (S)."""
    from igpt import IGPT, IGPTConfig
    out = {}
    for size, micro, batch, steps in [("s", 64, 128, 60), ("m", 32, 128, 40)]:
        ips, mfu = _train_py_throughput(size, micro, batch, steps)
        out[f"ours_{size}"] = {"images_per_s": ips, "mfu": mfu, "micro_batch_size": micro}
        print(f"ours iGPT-{size.upper()}: {ips:.0f} images/s, MFU {100 * mfu:.1f}% (micro-batch {micro})", flush=True)
    for size, micro in [("s", 16)]:
        ips = _hf_train_throughput(size, micro)
        mfu = IGPT(IGPTConfig.preset(size)).estimate_mfu(ips)
        out[f"hf_{size}"] = {"images_per_s": ips, "mfu": mfu, "micro_batch_size": micro}
        ratio = out[f"ours_{size}"]["images_per_s"] / ips
        print(f"transformers iGPT-{size.upper()}: {ips:.0f} images/s, MFU {100 * mfu:.1f}%; ours is {ratio:.1f}x",
              flush=True)
        out[f"ratio_{size}"] = ratio
    return out

@benchmark
def train_bert():
    """train.py's images/s and MFU for iGPT-S with the BERT objective beside the autoregressive one, in one run
    with the same settings. The MFU counts each objective's attention (igpt.IGPT.flops_per_token): bidirectional
    attention does about twice the causal one's work. IGPT_BENCH_SMALL=1: 2 layers, 8x8 images, on the CPU."""
    small = _small()
    n_px, depth = (8, ["--n_layer", "2"]) if small else (32, [])
    micro, batch, steps = (16, 16, 30) if small else (64, 128, 60)
    out = {}
    for name, flags in (("autoregressive", []), ("bert", ["--bert"])):
        ips, mfu = _train_py_throughput("s", micro, batch, steps, n_px, [*depth, *flags])
        out[name] = {"images_per_s": ips, "mfu": mfu, "micro_batch_size": micro}
        print(f"iGPT-S{' (2 layers, 8x8)' if small else ''} {name}: {ips:.0f} images/s"
              + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""), flush=True)
    out["bert_over_autoregressive_images_per_s"] = out["bert"]["images_per_s"] / out["autoregressive"]["images_per_s"]
    print(f"BERT trains at {out['bert_over_autoregressive_images_per_s']:.2f}x the autoregressive images/s",
          flush=True)
    return out


# ---- parallel.py: past one GPU's memory ----

SMALL_SIZES = dict(n_layer=2, n_embd=64, n_head=4)  # the presets shrunk for IGPT_BENCH_SMALL=1's smoke runs


def _small_flags():
    """train.py's flags that shrink a preset to SMALL_SIZES under IGPT_BENCH_SMALL=1 (else none)."""
    return [a for k, v in SMALL_SIZES.items() for a in (f"--{k}", v)] if _small() else []


# Set in every process the benchmarks start, as NCCL's NVLS, PyTorch's symmetric memory and NVSHMEM read them:
# NVLink multicast stays off, since on a host whose GPUs others share a program using it can take them out of
# service.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _torchrun_train(argv, nproc=1, stop_after=0, timeout=360):
    """train.py with argv under `torch.distributed.run --standalone --nproc_per_node=nproc` (one process a GPU; on
    the CPU, gloo), in a session of its own with MULTICAST_OFF in its environment, and with --no-memory_check, so
    that the GPU and not the estimate says what fits. stop_after > 0: every process is killed (SIGKILL, so none
    writes a checkpoint on the way out) once rank 0 has logged step stop_after + 1; all are killed after `timeout`
    seconds in any case. Returns (exit status, stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
           "--no-memory_check", *map(str, argv)]
    with tempfile.TemporaryFile("w+") as stderr:
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
                               cwd=os.path.dirname(os.path.abspath(__file__)), env={**os.environ, **MULTICAST_OFF})
        timed_out = threading.Event()
        timer = threading.Timer(timeout, lambda: (timed_out.set(), _kill_torchrun(run.pid)))
        timer.start()
        for line in run.stdout:
            if stop_after and line.startswith(f"step {stop_after + 1}/"):
                _kill_torchrun(run.pid)
                break
        timer.cancel()
        run.wait()
        stderr.seek(0)
        return run.returncode, stderr.read() + (f"\nkilled after {timeout} s" if timed_out.is_set() else "")


def _kill_torchrun(pid):
    """SIGKILL the torchrun of process id pid, which leads a session of its own, and its workers, all at once:
    torchrun starts each worker in a session of its own too, where a signal to torchrun's would not reach."""
    workers = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            with open(stat) as f:
                parent = int(f.read().rpartition(")")[2].split()[1])  # after the command's name: state, parent
            if parent == pid:
                workers.append(int(stat.split("/")[2]))
    for session in [*workers, pid]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session, signal.SIGKILL)


def _log_records(out):
    """The records of train.py's log.jsonl in the run folder out (none when it has none)."""
    log = os.path.join(out, "log.jsonl")
    return [json.loads(line) for line in open(log)] if os.path.exists(log) else []


def _train_py_memory(size, n_px, micro_batch_size, options, steps=8, warmup=3, nproc=1):
    """train.py on nproc GPUs (processes of their own: an out-of-memory error and the compiled code stay there) on
    random tokens, micro_batch_size images a step on each, stopped after `steps` logged steps, before it would
    evaluate or save. Returns rank 0's peak memory (the log's max_memory_gb; None on the CPU), the median images/s
    of all processes together after `warmup` steps, the losses logged and the seconds the launch took (start-up,
    compilation and all), or None when it ran out of memory. IGPT_BENCH_SMALL=1: the preset shrunk to SMALL_SIZES.
    """
    with tempfile.TemporaryDirectory() as tmp:
        batch_size = micro_batch_size * nproc
        prefix, out = _random_token_files(tmp, 2 * batch_size, n_px), os.path.join(tmp, "out")
        argv = ["--data", prefix, "--out", out, "--model", size, "--batch_size", batch_size,
                "--micro_batch_size", micro_batch_size, "--max_steps", 1000000, "--eval_interval", 1000000,
                "--warmup_steps", 2, "--log_interval", 1, *options, *_small_flags()]
        started = time.perf_counter()
        _, errors = _torchrun_train(argv, nproc, stop_after=steps)
        wall_s = time.perf_counter() - started
        records = _log_records(out)
    timed = [r for r in records if warmup < r["step"] <= steps]
    if len(timed) < steps - warmup:
        if "out of memory" in errors:
            return None
        raise RuntimeError(f"train.py {' '.join(map(str, argv))} on {nproc} process(es) failed:\n{errors[-3000:]}")
    return {"micro_batch_size": micro_batch_size, "max_memory_gb": timed[-1]["max_memory_gb"],
            "images_per_s": statistics.median(r["images_per_s"] for r in timed),
            "losses": [r["loss"] for r in records if r["step"] <= steps], "wall_s": wall_s}


def _bench_config(size, n_px):
    """The IGPTConfig of a preset as the runs here train it (shrunk to SMALL_SIZES under IGPT_BENCH_SMALL=1)."""
    from igpt import IGPTConfig
    return IGPTConfig.preset(size, n_px=n_px, **(SMALL_SIZES if _small() else {}))


def _estimate(config, micro_batch_size, options, world=1):
    """parallel.memory_estimate's total bytes per GPU for train.py with these options on world GPUs."""
    import parallel
    return parallel.memory_estimate(config, micro_batch_size, world, fsdp="--fsdp" in options,
                                    activation_checkpointing="--activation_checkpointing" in options)["total"]


def _estimated_largest(config, options, capacity):
    """The largest micro-batch that parallel.memory_estimate fits in capacity bytes (at least 1)."""
    one, two = (_estimate(config, m, options) for m in (1, 2))
    return max(1, int((capacity - one) // (two - one)) + 1)


def _gb(gb):
    return f"{gb:.1f} GB" if gb >= 0.1 else f"{1e3 * gb:.1f} MB"


def _peak(result):
    """The peak memory of a result of _train_py_memory, as words."""
    return _gb(result["max_memory_gb"]) if result["max_memory_gb"] is not None else "not measured on the CPU"


EAGER = ["--compile", "off"]  # the memory runs: the model's own memory, and no compile before each try of a batch


def _memory_runs(size, n_px, options, micro_batch_size=None):
    """train.py's peak memory and images/s at micro_batch_size, or else at the largest the estimate fits on this
    GPU and, while that runs out of memory, at three quarters of the last; beside the estimate itself. On the CPU
    (no memory to fill) 4 images."""
    config = _bench_config(size, n_px)
    capacity = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    micro = micro_batch_size or (_estimated_largest(config, options, capacity) if capacity else 4)
    while (result := _train_py_memory(size, n_px, micro, options)) is None and micro > 1:
        print(f"  {micro} images ran out of memory", flush=True)
        micro = max(1, micro * 3 // 4)
    if result is None:
        return {"micro_batch_size": 1, "out_of_memory": True}
    result["estimate_gb"] = _estimate(config, result["micro_batch_size"], options) / 1e9
    eager = options[:len(EAGER)] == EAGER
    label = " ".join(["one GPU", *options[len(EAGER) if eager else 0:], *(["eager"] if eager else [])])
    print(f"iGPT-{size.upper()} {n_px}x{n_px}, {label}: micro-batch "
          f"{result['micro_batch_size']}, {result['images_per_s']:.1f} images/s, peak {_peak(result)}, estimate "
          f"{_gb(result['estimate_gb'])}", flush=True)
    return result



def _checkpointing_trade(n_px):
    """iGPT-L on one GPU without and with activation checkpointing (eager): each at its largest micro-batch, and
    checkpointing also at the largest without it, where the memory saved and the throughput lost are read."""
    plain = _memory_runs("l", n_px, EAGER)
    same = _memory_runs("l", n_px, [*EAGER, "--activation_checkpointing"], plain["micro_batch_size"])
    largest = _memory_runs("l", n_px, [*EAGER, "--activation_checkpointing"])
    out = {"plain": plain, "checkpointed_same_batch": same, "checkpointed": largest}
    if "images_per_s" in plain and plain["max_memory_gb"] is not None:
        out["memory_saved_gb"] = plain["max_memory_gb"] - same["max_memory_gb"]
        out["throughput_lost"] = 1 - same["images_per_s"] / plain["images_per_s"]
        print(f"activation checkpointing at micro-batch {plain['micro_batch_size']}: {out['memory_saved_gb']:.1f} GB "
              f"saved, {100 * out['throughput_lost']:.0f}% of the images/s lost", flush=True)
    return out


@benchmark
def memory_l32():
    """iGPT-L on 32x32 images on one GPU, train.py without and with --activation_checkpointing: peak memory and
    images/s at the largest micro-batch that fits, and the memory saved and throughput lost at the same batch.
    IGPT_BENCH_SMALL=1: 2 layers, 8x8 images, 4 a step, for a CPU smoke run."""
    return _checkpointing_trade(8 if _small() else 32)


@benchmark
def memory_l64():
    """memory_l32 on 64x64 images (4096 tokens). IGPT_BENCH_SMALL=1 as there."""
    return _checkpointing_trade(8 if _small() else 64)


@benchmark
def memory_xl():
    """iGPT-XL on one GPU under --fsdp --activation_checkpointing (eager), on 32x32 images: does a step run, at
    which micro-batch, its peak memory and images/s. IGPT_BENCH_SMALL=1: 2 layers, 8x8 images, 4 a step."""
    n_px = 8 if _small() else 32
    return {f"xl_{n_px}": _memory_runs("xl", n_px, [*EAGER, "--fsdp", "--activation_checkpointing"])}


# ---- many GPUs: train.py under torchrun, DDP and FSDP ----

def multi_gpu(fn):
    """For a benchmark of several GPUs: it runs on a host with two or more, and on one without a GPU as
    IGPT_BENCH_SMALL=1's smoke run (CPU processes, gloo); elsewhere it says why not and gives no figures (None)."""
    @functools.wraps(fn)
    def run():
        gpus = torch.cuda.device_count()
        if gpus < 2 and not (gpus == 0 and _small()):
            print(f"{fn.__name__} needs 2 GPUs or more and this host has {gpus}"
                  + ("" if gpus else " (IGPT_BENCH_SMALL=1 runs it on CPU processes)"), flush=True)
            return None
        return fn()
    run.multi_gpu = True  # its result file names the number of GPUs
    return run


def _gpu_counts(least=1, every=True):
    """The numbers of GPUs to train on: of 1, 2, 4 and 8, those from `least` up to the GPUs this host has (2 CPU
    processes without a GPU), every one or (every=False) the fewest and the most; IGPT_BENCH_GPUS=2,8 picks instead.
    """
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 2
    counts = [n for n in (1, 2, 4, 8) if least <= n <= visible]
    if "IGPT_BENCH_GPUS" in os.environ:
        return [n for n in counts if str(n) in os.environ["IGPT_BENCH_GPUS"].split(",")]
    return counts if every else sorted({counts[0], counts[-1]})


def _on(n):
    """'2 GPUs', or '2 CPU processes' on a host without a GPU."""
    unit = ("GPU", "GPUs") if torch.cuda.is_available() else ("CPU process", "CPU processes")
    return f"{n} {unit[n > 1]}"


def _scaling(size, micro_batch_size, options, counts):
    """train.py for iGPT-size under torchrun on each number of GPUs in counts, with micro_batch_size 32x32 images a
    step on every GPU (so the batch grows with the GPUs): the images/s of all together, its efficiency against that
    many times the one-GPU figure (when counts has 1), and rank 0's peak memory beside the estimate.
    IGPT_BENCH_SMALL=1: SMALL_SIZES, 8x8 images, 4 a step."""
    n_px, micro = (8, 4) if _small() else (32, micro_batch_size)
    config = _bench_config(size, n_px)
    kind = "FSDP" if "--fsdp" in options else "DDP"
    runs = {}
    for n in counts:
        result = _train_py_memory(size, n_px, micro, options, nproc=n) or {"micro_batch_size": micro,
                                                                            "out_of_memory": True}
        result["estimate_gb"] = _estimate(config, micro, options, world=n) / 1e9
        one = runs.get("gpus_1", {}).get("images_per_s")
        if one and "images_per_s" in result:
            result["efficiency"] = result["images_per_s"] / (n * one)
        runs[f"gpus_{n}"] = result
        setup = f"iGPT-{size.upper()}" + (f", {kind}" if n > 1 or kind == "FSDP" else "")
        setup += "".join(f" {o}" for o in options if o != "--fsdp")
        if "images_per_s" not in result:
            print(f"{setup} on {_on(n)}, {micro} images a step each: out of memory (estimate "
                  f"{_gb(result['estimate_gb'])} a process)", flush=True)
            continue
        ips = result["images_per_s"]
        print(f"{setup} on {_on(n)}, {micro} images a step each: {ips:.1f} images/s ({ips / n:.1f} each)"
              + (f", {100 * result['efficiency']:.1f}% of {n}x one's" if "efficiency" in result else "")
              + f"; peak {_peak(result)}, estimate {_gb(result['estimate_gb'])} a process", flush=True)
    return runs


def _fsdp_against_ddp(size, micro_batch_size):
    """_scaling under DDP and under --fsdp on the same numbers of GPUs: FSDP's images/s and peak memory as
    fractions of DDP's."""
    counts = _gpu_counts(least=2, every=False)
    out = {"ddp": _scaling(size, micro_batch_size, [], counts),
           "fsdp": _scaling(size, micro_batch_size, ["--fsdp"], counts), "fsdp_over_ddp": {}}
    for n in counts:
        ddp, fsdp = out["ddp"][f"gpus_{n}"], out["fsdp"][f"gpus_{n}"]
        if "images_per_s" not in ddp or "images_per_s" not in fsdp:
            continue
        ratio = {"images_per_s": fsdp["images_per_s"] / ddp["images_per_s"]}
        if ddp["max_memory_gb"] is not None:
            ratio["max_memory_gb"] = fsdp["max_memory_gb"] / ddp["max_memory_gb"]
        out["fsdp_over_ddp"][f"gpus_{n}"] = ratio
        print(f"iGPT-{size.upper()} on {_on(n)}: FSDP at {ratio['images_per_s']:.2f}x DDP's images/s"
              + (f", {ratio['max_memory_gb']:.2f}x its peak memory" if "max_memory_gb" in ratio else ""), flush=True)
    return out


@benchmark
@multi_gpu
def ddp_scaling_s():
    """iGPT-S under DDP, bf16, compiled, 64 images a step on each GPU, on 1, 2, 4 and 8 GPUs (as many as the host
    has; IGPT_BENCH_GPUS=1,2 picks): images/s, the efficiency against N times one GPU's (the target is 90%), peak
    memory per GPU and the estimate. IGPT_BENCH_SMALL=1: a tiny model on 1 and 2 CPU processes (gloo)."""
    return _scaling("s", 64, [], _gpu_counts())


@benchmark
@multi_gpu
def ddp_scaling_m():
    """ddp_scaling_s for iGPT-M, 32 images a step on each GPU."""
    return _scaling("m", 32, [], _gpu_counts())


@benchmark
@multi_gpu
def fsdp_scaling_m():
    """iGPT-M under --fsdp and under DDP on 2 GPUs and on all the host has (IGPT_BENCH_GPUS=2,4,8 for more
    counts), 32 images a step on each, bf16, compiled: images/s and peak memory per GPU of each, the estimate beside
    it, and FSDP's as fractions of DDP's. IGPT_BENCH_SMALL=1: a tiny model on 2 CPU processes."""
    return _fsdp_against_ddp("m", 32)


@benchmark
@multi_gpu
def fsdp_scaling_l():
    """fsdp_scaling_m for iGPT-L, 16 images a step on each GPU."""
    return _fsdp_against_ddp("l", 16)


@benchmark
@multi_gpu
def fsdp_xl():
    """iGPT-XL (6.8B parameters) under --fsdp --activation_checkpointing on 2 GPUs and on all the host has
    (IGPT_BENCH_GPUS=2,4,8 for more counts), 16 32x32 images a step on each: does it train (the losses of its steps
    are in the figures), at what images/s, and its peak memory per GPU beside the estimate. Every process builds
    the whole model in host memory before sharding it. IGPT_BENCH_SMALL=1: a tiny model on 2 CPU processes."""
    return _scaling("xl", 16, ["--fsdp", "--activation_checkpointing"], _gpu_counts(least=2, every=False))


def _relative_difference(a, b, keys):
    """The largest |a[k] - b[k]| / |b[k]| over keys."""
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in keys)


def _killed_and_resumed(options, steps=12, cut=6):
    """iGPT-S (bf16, compiled) on 2 GPUs for `steps` steps of 64 images on each, with flips: once uninterrupted,
    once killed (every process, SIGKILL) right after its checkpoint of step `cut` and continued with --resume. The
    largest relative difference between the two runs' losses before the cut, where they ran the same computation
    (the GPU's run-to-run noise), after it (that noise and whatever the resume changed), and of the final
    evaluation. IGPT_BENCH_SMALL=1: SMALL_SIZES, 8x8 images, 4 a step, on 2 CPU processes."""
    import parallel
    from igpt import load_checkpoint
    n_px, micro = (8, 4) if _small() else (32, 64)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = _random_token_files(tmp, 8 * micro, n_px)
        whole, cut_out = os.path.join(tmp, "whole"), os.path.join(tmp, "cut")
        argv = ["--data", prefix, "--model", "s", "--batch_size", 2 * micro, "--micro_batch_size", micro,
                "--max_steps", steps, "--warmup_steps", 2, "--log_interval", 1, "--flip", "--ckpt_interval", cut,
                "--ckpt_minutes", 0, "--eval_interval", steps, "--eval_images", 2 * micro, *options,
                *_small_flags()]

        def must(run_argv, stop_after=0):
            code, errors = _torchrun_train(run_argv, 2, stop_after)
            if code != 0 and not stop_after:
                raise RuntimeError(f"train.py {' '.join(map(str, run_argv))} failed:\n{errors[-3000:]}")
            return errors
        must([*argv, "--out", whole])
        errors = must([*argv, "--out", cut_out], stop_after=cut)
        path = parallel.find_checkpoint(cut_out)
        if path is None:
            raise RuntimeError(f"the run to be killed wrote no checkpoint:\n{errors[-3000:]}")
        saved = (parallel.read_train_state(path) if os.path.isdir(path) else load_checkpoint(path))["step"]
        must(["--resume", "--out", cut_out])
        records = {name: _log_records(out) for name, out in [("whole", whole), ("resumed", cut_out)]}
    by_step = lambda name, key: {r["step"]: r[key] for r in records[name] if key in r}
    whole, resumed = by_step("whole", "loss"), by_step("resumed", "loss")
    assert resumed.keys() == whole.keys() == set(range(1, steps + 1)), "the runs did not log every step"
    out = {"checkpoint_step": saved, "losses_whole": list(whole.values()), "losses_resumed": list(resumed.values()),
           "before_cut": _relative_difference(resumed, whole, range(1, cut + 1)),
           "after_cut": _relative_difference(resumed, whole, range(cut + 1, steps + 1)),
           "final_eval": _relative_difference(by_step("resumed", "va_loss"), by_step("whole", "va_loss"), [steps])}
    kind = "FSDP" if "--fsdp" in options else "DDP"
    print(f"{kind} on {_on(2)}, killed after its step-{saved} checkpoint and resumed: losses of steps "
          f"{cut + 1}-{steps} within {out['after_cut']:.1e} (relative) of the uninterrupted run's, of steps "
          f"1-{cut} (the same computation twice) within {out['before_cut']:.1e}; the final evaluation within "
          f"{out['final_eval']:.1e}", flush=True)
    return out


@benchmark
@multi_gpu
def multi_gpu_resume():
    """Exact resume on 2 GPUs under DDP and under --fsdp: iGPT-S killed after a checkpoint and resumed, against the
    same run uninterrupted (_killed_and_resumed). IGPT_BENCH_SMALL=1: a tiny model on 2 CPU processes, where the
    losses agree to float32 rounding."""
    return {"ddp": _killed_and_resumed([]), "fsdp": _killed_and_resumed(["--fsdp"])}


# ---- sample.py: KV-cached generation ----

def _sampling_model(size):
    """A random iGPT of the released size in bf16 on the GPU, with a non-zero head so sampling is not uniform."""
    from igpt import IGPT, IGPTConfig
    torch.manual_seed(0)
    model = IGPT(IGPTConfig.preset(size))
    torch.nn.init.normal_(model.wtet.weight, std=0.02)
    return model.to("cuda", torch.bfloat16).eval()


def _generation_bytes(model, batch_size):
    """Bytes a whole generation must read at the least: at each step the cached prefix (k and v, bf16) and the
    weights once, but the embedding tables, of which a step reads a row."""
    c = model.config
    T = c.block_size
    per_position = c.n_layer * 2 * c.n_embd * 2 * batch_size
    return sum(range(1, T + 1)) * per_position + T * model.get_num_params(non_embedding=True) * 2


def read_bandwidth():
    """Bytes per second this GPU reads at: torch.sum over 4 GB, the best of 5, the floor any cache read runs at."""
    x = torch.empty(1 << 30, dtype=torch.float32, device="cuda").fill_(1.0)
    seconds = min(timeit(lambda: x.sum(), warmup=2, repeat=1) for _ in range(5))
    del x
    torch.cuda.empty_cache()
    return (1 << 32) / seconds


def _time_generate(model, batch_size, fast=True, repeat=3):
    """Seconds of one engine's generate for batch_size images: the median of `repeat` calls that replay the
    graphs the call before captured, and the first call of a new engine, which captures its own (after a warm-up
    engine compiled the step). fast=False: the plain path (igpt.generate, its step compiled), one call."""
    from engine import Engine
    g = torch.Generator(device="cuda").manual_seed(0)
    Engine(model, fast=fast).generate(num_samples=batch_size, generator=g)  # compile
    engine = Engine(model, fast=fast)
    run = lambda: engine.generate(num_samples=batch_size, generator=g)
    first = timeit(run, warmup=0, repeat=1)
    return (timeit(run, warmup=0, repeat=repeat) if fast else first), first


def _hf_generate_seconds(batch_size):
    """transformers' generate for ImageGPT (its own KV cache, eager), iGPT-S in bf16, 1024 sampled tokens."""
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(vocab_size=513, n_positions=1024, n_embd=512,
                                                          n_layer=24, n_head=8)).to("cuda", torch.bfloat16).eval()
    context = torch.full((batch_size, 1), 512, device="cuda")
    run = lambda length: model.generate(context, max_length=length, min_length=length, do_sample=True, top_k=0,
                                        pad_token_id=0)
    run(17)  # warm-up: kernels loaded, handles made; a whole image takes tens of seconds and teaches nothing more
    seconds = timeit(lambda: run(1025), warmup=0, repeat=1)
    del model
    torch.cuda.empty_cache()
    return seconds


@benchmark
def sample():
    """iGPT-S, bf16, 1024 tokens per image: 64 images and one image through the engine (the fused step compiled
    into CUDA graphs), through the plain path (igpt.generate, its step compiled), and transformers' generate;
    achieved memory bandwidth from the bytes the cache forces, against what this GPU reads at."""
    out = {"read_bandwidth_GB_per_s": read_bandwidth() / 1e9}
    print(f"this GPU reads at {out['read_bandwidth_GB_per_s']:.0f} GB/s (torch.sum)", flush=True)
    model = _sampling_model("s")
    for batch_size in (64, 1):
        seconds, first = _time_generate(model, batch_size)
        floor = _generation_bytes(model, batch_size) / (out["read_bandwidth_GB_per_s"] * 1e9)
        gbps = _generation_bytes(model, batch_size) / seconds / 1e9
        plain = _time_generate(model, batch_size, fast=False)[0]
        out[f"ours_b{batch_size}"] = {"seconds": seconds, "GB_per_s": gbps, "bandwidth_floor_s": floor,
                                      "first_call_seconds": first, "plain_seconds": plain}
        print(f"ours: {batch_size} image(s) in {seconds:.3f}s, {gbps:.0f} GB/s (memory floor {floor:.2f}s); "
              f"a new engine's first call, capturing the steps: {first:.3f}s; the plain path: {plain:.3f}s",
              flush=True)
    del model
    for batch_size in (64, 1):
        seconds = _hf_generate_seconds(batch_size)
        ratio = seconds / out[f"ours_b{batch_size}"]["seconds"]
        out[f"hf_b{batch_size}"] = {"seconds": seconds, "ratio": ratio}
        print(f"transformers generate: {batch_size} image(s) {seconds:.2f}s; ours is {ratio:.1f}x faster",
              flush=True)
    return out


@benchmark
def sample_throughput():
    """Images per second at a large batch for iGPT-S, -M and -L (bf16, compiled step): 512, 256 and 128
    sequences, as many as keep the caches well inside 80 GB. IGPT_BENCH_SIZES=s,m picks sizes."""
    out = {}
    sizes = os.environ.get("IGPT_BENCH_SIZES", "s,m,l").split(",")
    for size, batch_size in [("s", 512), ("m", 256), ("l", 128)]:
        if size not in sizes:
            continue
        torch._dynamo.reset()  # a fresh compile per model, so no size runs into the recompile limit
        model = _sampling_model(size)
        seconds = _time_generate(model, batch_size, repeat=1)[0]
        out[f"{size}_b{batch_size}"] = {"images_per_s": batch_size / seconds, "seconds": seconds}
        print(f"iGPT-{size.upper()} batch {batch_size}: {batch_size / seconds:.1f} images/s "
              f"({seconds:.2f}s a batch)", flush=True)
        del model
        torch.cuda.empty_cache()
    return out


# ---- demo.py: streamed completions ----

def _stream_seconds(engine, palette, prime, rows_kept, n, temperature):
    """One demo.complete call: (seconds to the first row drawn, seconds to the whole grid, rows seen, last grid)."""
    import demo
    sync()
    t0 = time.perf_counter()
    first, rows_seen = None, 0
    for rows, grid in demo.complete(engine, palette, prime, rows_kept, n, temperature=temperature, seed=0):
        if rows > rows_kept:
            rows_seen += 1
            first = first or time.perf_counter() - t0
    return first, time.perf_counter() - t0, rows_seen, grid


@benchmark
def demo():
    """demo.py's complete() as the page runs it: iGPT-S (random weights, bf16, the fused step on a GPU), 8
    completions of the top half of a 32x32 image. Seconds to the first row drawn and to the whole grid: the first
    call (compile and capture), a warm call, Engine.generate alone (what streaming adds), a first call at a new
    temperature; the rows that reached the caller (a row is dropped when the next is done first), and the seconds
    the page takes to draw one frame (demo.TILE pixels an image, PNG). IGPT_BENCH_SMALL=1: 2 layers, 8x8 images,
    on the CPU, to check it runs."""
    import io

    import numpy as np
    from PIL import Image

    import demo as page
    from common import default_device, grid_image
    from engine import Engine
    from igpt import IGPT, IGPTConfig
    from palette import decode
    small = _small()
    device = default_device()
    torch.manual_seed(0)
    model = IGPT(IGPTConfig.preset("s", **(dict(n_layer=2, n_px=8) if small else {})))
    torch.nn.init.normal_(model.wtet.weight, std=0.02)
    model = model.to(device, torch.bfloat16 if device == "cuda" else torch.float32).eval()
    c = model.config
    palette = np.random.default_rng(0).uniform(-1, 1, (c.n_vocab, 3)).astype(np.float32)
    prime = np.random.default_rng(1).integers(0, c.n_vocab, c.block_size)
    rows_kept, n = c.n_px // 2, 8
    engine = Engine(model)
    out = {"path": "fused" if engine.fast else "plain", "rows_drawn": c.n_px - rows_kept}
    for name, temperature in [("first_call", 1.0), ("warm", 1.0), ("new_temperature", 0.9)]:
        first, total, rows_seen, grid = _stream_seconds(engine, palette, prime, rows_kept, n, temperature)
        out[name] = {"first_row_s": first, "total_s": total, "rows_seen": rows_seen}
        print(f"{name}: first row {first:.3f}s, whole grid {total:.3f}s, {rows_seen} of {c.n_px - rows_kept} rows "
              "seen", flush=True)
    g = lambda: torch.Generator(device=device).manual_seed(0)
    primed = torch.as_tensor(prime[:rows_kept * c.n_px]).repeat(n, 1).to(device)
    tokens = engine.generate(prime=primed, temperature=0.9, generator=g())
    assert np.array_equal(grid[0, 1:n + 1], decode(tokens.cpu().numpy(), palette)), "the stream is not generate's"

    def generate_alone():  # in a thread of its own, as complete() runs it, so only the streaming differs
        thread = threading.Thread(target=lambda: engine.generate(prime=primed, generator=g()))
        thread.start()
        thread.join()
    out["generate_alone_s"] = timeit(generate_alone, warmup=1, repeat=3)

    def frame():
        Image.fromarray(grid_image(grid, scale=max(1, page.TILE // c.n_px))).save(io.BytesIO(), format="PNG")
    out["page_frame_s"] = timeit(frame, warmup=1, repeat=5)
    print(f"Engine.generate alone: {out['generate_alone_s']:.3f}s; one frame of the page: "
          f"{out['page_frame_s'] * 1e3:.1f} ms ({out['path']} path)", flush=True)
    return out


# ---- tf_checkpoint.py: crc32c, which checks every tensor read from a TF checkpoint ----

@benchmark
def crc32c():
    """Throughput of tf_checkpoint.py's NumPy crc32c on 256 MB (CPU-bound: it measures the host, not the GPU)."""
    import numpy as np
    from tf_checkpoint import crc32c as crc
    data = np.random.default_rng(0).integers(0, 256, 256 << 20, dtype=np.uint8)
    mb_s = data.nbytes / 1e6 / timeit(lambda: crc(data), warmup=1, repeat=3)
    print(f"crc32c: {mb_s:.0f} MB/s", flush=True)
    return {"MB_per_s": mb_s}


def main():
    from common import write_json
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help=f"benchmarks to run: {', '.join(BENCHMARKS)} or all")
    parser.add_argument("--out", default="", help="folder for NAME_DEVICE.json, one a benchmark (default: '', none)")
    args = parser.parse_args()
    names = list(BENCHMARKS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    for name in names:
        print(f"== {name} on {device_name()}", flush=True)
        result = BENCHMARKS[name]()
        gpus = torch.cuda.device_count() if getattr(BENCHMARKS[name], "multi_gpu", False) else 1
        figures = {"device": device_name(), **({"gpus": gpus} if gpus > 1 else {}), "torch": torch.__version__,
                   name: result}
        if args.out and result is not None:  # after each, so a run cut short keeps what it measured
            write_json(os.path.join(args.out, f"{name}_{device_slug(gpus)}.json"), figures)


if __name__ == "__main__":
    main()
