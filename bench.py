"""
Benchmarks. Each is a function registered with @benchmark; run them on a GPU:

    python bench.py train sample               # some
    python bench.py all --out results          # every one, each kept as results/NAME_DEVICE.json

Every benchmark prints its figures and returns them as a dict; with --out each lands in OUT/NAME_DEVICE.json
(e.g. results/sample_h200.json) as soon as it finishes. Timings are wall-clock with the GPU synchronised around
each run, after warm-up; medians are reported.
"""
import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch

BENCHMARKS = {}


def benchmark(fn):
    BENCHMARKS[fn.__name__] = fn
    return fn


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def device_slug():
    """A short name for result files: the GPU's model ("NVIDIA H200" -> h200), or cpu."""
    import re
    if not torch.cuda.is_available():
        return "cpu"
    name = device_name().replace("NVIDIA", "")
    found = re.search(r"\b([A-Za-z]+\d+\w*)\b", name)
    return found.group(1).lower() if found else re.sub(r"\W+", "-", name.strip()).lower()


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
    import os

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
    small = os.environ.get("IGPT_BENCH_SMALL") == "1"
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
    candidates = {"linear_gelu": kernels.linear_gelu, "cublas_then_activation": unfused, "cublas_product_only": F.linear}
    for name, fn in candidates.items():
        rel = relative_error(fn(x, w), ref) if name != "cublas_product_only" else None
        out[name] = {"ms": timeit(lambda: [fn(x, w) for _ in range(50)], warmup=2, repeat=5) / 50 * 1e3,
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
    small = os.environ.get("IGPT_BENCH_SMALL") == "1"
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


# ---- train.py: training throughput and MFU ----

def _random_token_files(folder, n_images, n_px=32, n_vocab=512):
    import numpy as np
    rng = np.random.default_rng(0)
    prefix = os.path.join(folder, "random")
    for split in ("tr", "va"):
        np.save(f"{prefix}_{split}X.npy", rng.integers(0, n_vocab, (n_images, n_px * n_px), dtype=np.uint16))
    return prefix


def _train_py_throughput(size, micro_batch_size, batch_size, steps=60):
    """Run train.py itself on random tokens and read images/s and MFU from its log (after compile warm-up)."""
    import train
    with tempfile.TemporaryDirectory() as tmp:
        prefix = _random_token_files(tmp, 4 * batch_size)
        out = os.path.join(tmp, "out")
        train.main(["--data", prefix, "--out", out, "--model", size, "--batch_size", str(batch_size),
                    "--micro_batch_size", str(micro_batch_size), "--max_steps", str(steps), "--warmup_steps", "10",
                    "--log_interval", "10", "--eval_interval", str(10 * steps), "--eval_images", "64"])
        records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    timed = [r for r in records if "images_per_s" in r and r["step"] > 20]  # skip compile and warm-up
    return statistics.median(r["images_per_s"] for r in timed), statistics.median(r["mfu"] for r in timed)


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
    weights once."""
    c = model.config
    T = c.block_size
    per_position = c.n_layer * 2 * c.n_embd * 2 * batch_size
    return sum(range(1, T + 1)) * per_position + T * model.get_num_params() * 2


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
        figures = {"device": device_name(), "torch": torch.__version__, name: BENCHMARKS[name]()}
        if args.out:  # after each, so a run cut short keeps what it measured
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"{name}_{device_slug()}.json"), "w") as f:
                json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
