"""
Benchmarks. Each is a function registered with @benchmark; run them on a GPU:

    python bench.py train sample          # some
    python bench.py all --out results.json

Every benchmark prints a short table and returns a dict of its figures; --out collects them as JSON.
Timings are wall-clock with the GPU synchronised around each run, after warm-up; medians are reported.
"""
import argparse
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


def device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


@benchmark
def precision():
    """iGPT-S logits under bf16 autocast and torch.compile against fp32 eager: relative error (target < 1e-2)."""
    from igpt import IGPT, IGPTConfig
    torch.manual_seed(0)
    model = IGPT(IGPTConfig.preset("s")).cuda().eval()
    torch.nn.init.normal_(model.wtet.weight, std=0.02)
    x = torch.randint(0, 512, (8, 1024), device="cuda")
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = False
        ref = model(x)[0].double()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast = torch.compile(model)(x)[0].double()
    rel = ((fast - ref).norm() / ref.norm()).item()
    print(f"bf16 + compile vs fp32 eager, iGPT-S logits: relative error {rel:.2e}")
    return {"relative_error": rel}


# ---- quantize.py: palette fit and encoding ----

# ---- probe.py: features and logistic regression ----

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
        train.main(["--data", prefix, "--out_dir", out, "--model", size, "--batch_size", str(batch_size),
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
    for size, micro, batch in [("s", 64, 128), ("m", 32, 128)]:
        ips, mfu = _train_py_throughput(size, micro, batch)
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


def _kv_bytes(model, batch_size, kv_bucket):
    """Bytes a whole generation must read: the cache prefix each step attends to, and the weights each step."""
    c = model.config
    T = c.block_size
    per_position = c.n_layer * 2 * c.n_embd * 2 * batch_size  # k and v, bf16
    reads = sum(min(T, -(-(i + 1) // kv_bucket) * kv_bucket) if kv_bucket else T for i in range(1, T))
    return reads * per_position + T * model.get_num_params() * 2


def _time_generate(model, batch_size, kv_bucket, repeat=3):
    from igpt import generate
    g = torch.Generator(device="cuda").manual_seed(0)
    return timeit(lambda: generate(model, num_samples=batch_size, generator=g, compile=True, kv_bucket=kv_bucket),
                  warmup=1, repeat=repeat)


def _hf_generate_seconds(batch_size):
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(vocab_size=513, n_positions=1024, n_embd=512,
                                                          n_layer=24, n_head=8)).to("cuda", torch.bfloat16).eval()
    context = torch.full((batch_size, 1), 512, device="cuda")
    run = lambda: model.generate(context, max_length=1025, do_sample=True, top_k=0, pad_token_id=0)
    seconds = timeit(run, warmup=1, repeat=1)
    del model
    return seconds


@benchmark
def sample():
    """iGPT-S, bf16, 1024 tokens per image: 64 images and one image, ours (static KV cache, compiled step and
    CUDA graphs) beside transformers' generate; achieved memory bandwidth from the bytes the cache forces."""
    out = {}
    model = _sampling_model("s")
    for batch_size in (64, 1):
        for kv_bucket in (128, None):
            seconds = _time_generate(model, batch_size, kv_bucket)
            gbps = _kv_bytes(model, batch_size, kv_bucket) / seconds / 1e9
            out[f"ours_b{batch_size}_bucket{kv_bucket}"] = {"seconds": seconds, "GB_per_s": gbps}
            print(f"ours: {batch_size} image(s), kv_bucket {kv_bucket}: {seconds:.3f}s, {gbps:.0f} GB/s", flush=True)
    del model
    for batch_size in (64, 1):
        seconds = _hf_generate_seconds(batch_size)
        best = min(v["seconds"] for k, v in out.items() if k.startswith(f"ours_b{batch_size}_"))
        out[f"hf_b{batch_size}"] = {"seconds": seconds, "ratio": seconds / best}
        print(f"transformers generate: {batch_size} image(s) {seconds:.2f}s; ours is {seconds / best:.1f}x faster",
              flush=True)
    return out


@benchmark
def sample_throughput():
    """Images per second at a large batch for iGPT-S, -M and -L (bf16, compiled step, kv_bucket 128)."""
    out = {}
    for size, batch_sizes in [("s", (256, 512)), ("m", (128, 256)), ("l", (64, 128))]:
        model = _sampling_model(size)
        for batch_size in batch_sizes:
            seconds = _time_generate(model, batch_size, 128, repeat=1)
            out[f"{size}_b{batch_size}"] = batch_size / seconds
            print(f"iGPT-{size.upper()} batch {batch_size}: {batch_size / seconds:.1f} images/s", flush=True)
        del model
        torch.cuda.empty_cache()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help=f"benchmarks to run: {', '.join(BENCHMARKS)} or all")
    parser.add_argument("--out", default=None, help="write all figures to this JSON file")
    args = parser.parse_args()
    names = list(BENCHMARKS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    results = {"device": device_name(), "torch": torch.__version__}
    for name in names:
        print(f"== {name} on {results['device']}", flush=True)
        results[name] = BENCHMARKS[name]()
        if args.out:  # after each, so a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
