"""
Benchmarks. Each is a function registered with @benchmark; run them on a GPU:

    python bench.py train sample          # some
    python bench.py all --out results.json

Every benchmark prints a short table and returns a dict of its figures; --out collects them as JSON.
Timings use CUDA events after warm-up and report medians (on the CPU, wall-clock).
"""
import argparse
import json
import statistics
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


# ---- quantize.py: palette fit and encoding ----

# ---- probe.py: features and logistic regression ----

# ---- train.py: training throughput and MFU ----

# ---- sample.py: KV-cached generation ----


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
