"""
The whole method end to end in one command: quantize -> train -> evaluate -> sample -> complete -> probe, then
for the CIFAR-10 recipe -> finetune.

    python pipeline.py                                                   # built-in shapes, CPU, a few minutes
    python pipeline.py --recipe cifar10                                  # CIFAR-10 from scratch, one GPU
    python pipeline.py --recipe cifar10 --source data/cifar10-jpeg.zip   # the same from JPEGs in class folders
    python pipeline.py --recipe cifar10 --stages sample,complete --force # redo some stages of that run
    python pipeline.py --recipe cifar10 --extra 'train=--no-flip --crop 0' --out out/no-aug   # a lever changed

Each stage is the matching script run with the recipe's flags (RECIPES below; `python X.py --help` explains
them), so every result can be reproduced stage by stage by hand. Under --out (default out/RECIPE) it writes:

    data/RECIPE_{tr,va,te}{X,Y}.npy, _palette.npy, _preview.png,     quantize.py: tokens, palette, preview, and
        _manifest.json                                                the checksums that tie them together
    train/ckpt.pt, train/log.jsonl                                    train.py: the model and its training log
    samples.png, completions.png (and .npy)                           sample.py: samples and completions
    probe/probe.json, probe/probe.png                                 probe.py: linear-probe accuracy by layer,
                                                                      of the raw pixels (--baseline, shapes) and
                                                                      of layers joined (--concat, cifar10)
    finetune/ckpt.pt, finetune/log.jsonl                              train.py --clf: fine-tuned, its test accuracy
    summary.json                                                      every stage's figures and wall time (a
                                                                      rerun of quantize or train drops those of
                                                                      the stages after it, made from before)
"""
import json
import os
import shlex
import sys
import time

import probe
import quantize
import sample
import train
from common import add_device_options, argument_parser, script, write_json
from data import CIFAR

# Flags for each stage. {source} is --source; the paths between stages are filled in by stage_args.
RECIPES = {
    # 16x16 shapes drawn on the fly (data.make_shapes): no download, sized for a few minutes on two CPU cores (the
    # README has the time measured). A palette of the four colours it draws codes them exactly; the ten test images
    # completed are one of each class (the labels cycle); the C grid reaches both the raw pixels' best (small C) and
    # the features' (large). docs/2026-12-01-main-job.md has the runs behind these choices.
    "shapes": {
        "quantize": ["shapes", "--test", "shapes", "--num_images", "5000", "--n_px", "16", "--k", "4"],
        "train": ["--n_layer", "4", "--n_embd", "64", "--n_head", "4", "--batch_size", "32",
                  "--micro_batch_size", "32", "--max_steps", "1250", "--learning_rate", "5e-3",
                  "--warmup_steps", "125", "--eval_interval", "625", "--log_interval", "125"],
        "sample": ["--num_samples", "36", "--temperature", "0.9", "--scale", "6"],
        "complete": ["--num_prime", "10", "--num_samples", "4", "--temperature", "0.9", "--scale", "6"],
        "probe": ["--Cs", "0.01,0.1,1,10,100", "--max_iter", "2000", "--baseline"],
    },
    # CIFAR-10 from scratch, sized for 10 minutes of training on one H100 or H200 (the README has the time
    # measured): a 12-layer, 512-wide iGPT (half of iGPT-S's depth, 39M parameters) for 5,700 steps of 128 images
    # (16 epochs of the 45,000-image train split), with the paper's flips and random crops (shifts of up to 2
    # pixels); the completions show a test image of each class; the probe's C grid reaches past the C the features
    # choose, and the paper's joined layers beside the table. Then a fine-tuning of that model with a classifier
    # beside the generative loss (the paper's joint objective, gen_weight 1), scored once on the test split at its
    # end.
    "cifar10": {
        "quantize": ["{source}:train", "--test", "{source}:test", "--download", "data"],
        "train": ["--n_layer", "12", "--n_embd", "512", "--n_head", "8", "--batch_size", "128",
                  "--micro_batch_size", "128", "--max_steps", "5700", "--learning_rate", "3e-3",
                  "--warmup_steps", "200", "--eval_interval", "2850", "--log_interval", "50", "--flip",
                  "--crop", "2"],
        "sample": ["--num_samples", "64", "--batch_size", "64"],
        "complete": ["--num_prime", "10", "--prime_classes", "--num_samples", "4", "--batch_size", "64"],
        "probe": ["--Cs", "1,10,100", "--concat", "8-12"],
        "finetune": ["--batch_size", "128", "--micro_batch_size", "128", "--max_steps", "1000", "--learning_rate",
                     "3e-4", "--warmup_steps", "100", "--flip", "--crop", "2", "--gen_weight", "1",
                     "--eval_split", "te", "--eval_interval", "1000", "--log_interval", "50"],
    },
}
SCRIPTS = {"quantize": quantize, "train": train, "evaluate": train, "sample": sample, "complete": sample,
           "probe": probe, "finetune": train}  # each stage runs SCRIPT.main(argv), in this process
STAGES = tuple(SCRIPTS)
OPTIONAL = ("finetune",)  # run only for the recipes that give them flags
UPSTREAM = ("quantize", "train")  # what every later stage reads: a rerun makes the later stages' figures stale


def recipe_stages(recipe):
    """The stages a recipe runs by default: every one but the optional stages it gives no flags."""
    return [s for s in STAGES if s not in OPTIONAL or s in RECIPES[recipe]]


def stage_args(recipe, stage, out, source, force, device, threads=0, extra=()):
    """The argv of one stage's script: the recipe's flags, then `extra` ones (of a flag given twice the later
    counts), then the paths that tie the stages together."""
    flags = [a.format(source=source) for a in RECIPES[recipe].get(stage, [])] + list(extra)
    data, ckpt = os.path.join(out, "data", recipe), os.path.join(out, "train", "ckpt.pt")
    paths = {
        "quantize": ["--out", data],
        "train": ["--data", data, "--out", os.path.join(out, "train")],
        "evaluate": ["--eval_only", "--ckpt", ckpt, "--data", data, "--eval_split", "te"],
        "sample": ["--ckpt", ckpt, "--out", out],
        "complete": ["--ckpt", ckpt, "--prime", f"{data}_teX.npy", "--out", out],
        "probe": ["--ckpt", ckpt, "--data", data, "--out", os.path.join(out, "probe")],
        "finetune": ["--ckpt", ckpt, "--clf", "--data", data, "--out", os.path.join(out, "finetune")],
    }[stage]
    overwrite = ["--force"] if force and stage != "evaluate" else []  # evaluating writes nothing
    return flags + paths + ["--device", device, "--threads", str(threads)] + overwrite


def summarise(stage, result):
    """The figures of a stage worth keeping in summary.json."""
    if stage == "probe":
        best = max(result["rows"], key=lambda r: r["val_acc"])
        pixels = {"pixels_test_acc": result["pixels"]["test_acc"]} if result["pixels"] else {}
        joint = ({"concat_layers": result["concat"]["layers"], "concat_test_acc": result["concat"]["test_acc"]}
                 if result["concat"] else {})
        return {"best_layer": best["layer"], "best_test_acc": best["test_acc"], **pixels, **joint,
                "test_acc_by_layer": {r["layer"]: r["test_acc"] for r in result["rows"]}}
    if stage in ("sample", "complete"):
        return {"png": result["png"], "images": result["images"]}
    return result


@script
def main(argv=None):
    p = argument_parser(__doc__)
    p.add_argument("--recipe", default="shapes", choices=sorted(RECIPES), help="what to train")
    p.add_argument("--source", default="cifar10",
                   help="the images for recipes that read a dataset: cifar10 (the official archive, fetched into "
                        "data/ when it is not there), a zip or folder with train/ and test/ class folders, or "
                        "CIFAR-10's python pickle folder")
    p.add_argument("--out", default="", help="output folder ('': out/RECIPE)")
    p.add_argument("--stages", default="", help="comma-separated stages to run, in order, of "
                   f"{','.join(STAGES)} ('': the recipe's: all, {' and '.join(OPTIONAL)} where it gives flags)")
    add_device_options(p)
    p.add_argument("--extra", action="append", default=[], metavar="STAGE=FLAGS",
                   help="flags for one stage after the recipe's, which they override: "
                        "--extra 'train=--max_steps 3500 --no-flip' (repeatable)")
    p.add_argument("--force", action="store_true", help="let the stages overwrite their earlier outputs")
    args = p.parse_args(argv)
    extra = {}
    for item in args.extra:
        stage, _, flags = item.partition("=")
        if stage not in STAGES or not flags:
            p.error(f"--extra {item!r}: give STAGE=FLAGS with a stage of {','.join(STAGES)}, e.g. "
                    "--extra 'train=--max_steps 3500'")
        extra[stage] = extra.get(stage, []) + shlex.split(flags)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] or recipe_stages(args.recipe)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    upstream = [s for s in stages if s in UPSTREAM]  # what the other stages read: first, and in order
    if len(set(stages)) < len(stages) or stages[:len(upstream)] != sorted(upstream, key=STAGES.index):
        p.error(f"--stages {','.join(stages)}: give each stage once, {' and '.join(UPSTREAM)} first, in that order "
                "(the other stages read what they write)")
    missing = [s for s in stages if s in OPTIONAL and s not in RECIPES[args.recipe]]
    if missing:
        p.error(f"the {args.recipe} recipe has no {missing[0]} stage; its stages: "
                f"{','.join(recipe_stages(args.recipe))}")
    needs_source = "quantize" in stages and any("{source}" in a for a in RECIPES[args.recipe]["quantize"])
    if needs_source and args.source not in CIFAR and not os.path.exists(args.source):
        p.error(f"--source {args.source!r} does not exist: the {args.recipe} recipe reads its images from it "
                "(a zip or folder with train/ and test/ class folders, or cifar10 for the official archive)")
    out = args.out or os.path.join("out", args.recipe)
    summary_path = os.path.join(out, "summary.json")
    summary = {}
    if os.path.exists(summary_path):
        try:
            with open(summary_path) as f:
                summary = json.load(f)
        except ValueError as e:
            raise SystemExit(f"{summary_path} is not a summary ({e}): move it away, or choose another --out")
        if not isinstance(summary, dict):
            raise SystemExit(f"{summary_path} is not a summary (not a JSON object): move it away, or choose "
                             "another --out")
    if summary.get("recipe", args.recipe) != args.recipe:  # its figures are another recipe's, not to be mixed in
        raise SystemExit(f"{out} holds a run of the {summary['recipe']} recipe: choose another --out for "
                         f"{args.recipe}")
    summary["recipe"] = args.recipe
    for stage in stages:
        argv_stage = stage_args(args.recipe, stage, out, args.source, args.force, args.device, args.threads,
                                extra.get(stage, ()))
        print(f"== {stage}: python {SCRIPTS[stage].__name__}.py {' '.join(argv_stage)}", flush=True)
        t0 = time.time()
        result = SCRIPTS[stage].main(argv_stage)
        summary[stage] = {**summarise(stage, result), "wall_seconds": round(time.time() - t0, 1),
                          "argv": argv_stage}
        stale = [later for later in STAGES[STAGES.index(stage) + 1:] if later in summary and stage in UPSTREAM]
        if stale:
            print(f"== dropped from the summary, as made from the {stage} stage's earlier output: "
                  f"{', '.join(stale)}", flush=True)
        for later in stale:
            del summary[later]
        # after every stage, so a run cut short keeps its figures
        write_json(summary_path, summary)
    print(f"== done: {summary_path}")
    for stage in STAGES:
        if stage in summary:
            figures = {k: v for k, v in summary[stage].items() if k not in ("argv", "test_acc_by_layer")}
            print(f"{stage:>9}: {json.dumps(figures)}")
    total = sum(summary[s]["wall_seconds"] for s in STAGES if s in summary)
    this_call = sum(summary[s]["wall_seconds"] for s in stages)
    print(f"{'total':>9}: {total:.0f} s" + (f" (this call's stages: {this_call:.0f} s)" if this_call != total else ""))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
