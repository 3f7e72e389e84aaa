"""train.py: learning, exact resume, DDP equivalence, and the errors that protect a user's run."""
import json
import math
import os
import re
import signal
import socket
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import igpt
import parallel
import quantize
import train
from data import load_tokens
from igpt import IGPT, IGPTConfig, fixed_mask, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--log_interval", "1", "--warmup_steps", "2",
        "--learning_rate", "1e-2"]


def write_tokens(folder, n=32, n_px=4, n_vocab=16, seed=0, labels=True):
    rng = np.random.default_rng(seed)
    prefix = os.path.join(folder, "toy")
    for split in ("tr", "va"):
        np.save(f"{prefix}_{split}X.npy", rng.integers(0, n_vocab, (n, n_px * n_px), dtype=np.uint16))
        if labels:
            np.save(f"{prefix}_{split}Y.npy", rng.integers(0, 3, n))
    np.save(f"{prefix}_palette.npy", (rng.random((n_vocab, 3)) * 2 - 1).astype(np.float32))
    return prefix


def losses(out_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if "loss" in r}


def run(*args):
    """train.py on the CPU, also where there is a GPU: exact, and nothing to compile."""
    return train.main([str(a) for a in args] + ["--device", "cpu"])


def torchrun(script, *args):
    """script with args on two CPU processes, as torchrun launches them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})


def evaluations(out_dir):
    """Every figure of the log but timings, by step and name: training losses, validation losses, accuracies."""
    return {(r["step"], k): v for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl")))
            for k, v in r.items() if k in ("loss", "va_loss", "accuracy")}


def test_a_tiny_model_overfits_a_handful_of_images(tmp_path):
    prefix = write_tokens(tmp_path, n=4)
    out = tmp_path / "out"
    run("--data", prefix, "--out", out, *TINY, "--batch_size", 4, "--micro_batch_size", 4,
        "--max_steps", 150, "--eval_interval", 150, "--learning_rate", 3e-2, "--grad_clip", 0)
    final = losses(out)[150]
    assert final < 0.1 < math.log(16)  # from ln(16) = 2.77 nats to memorised


@pytest.mark.parametrize("objective", [[], ["--bert"]], ids=["autoregressive", "bert"])
def test_killed_and_resumed_run_gives_the_losses_of_an_uninterrupted_run(tmp_path, monkeypatch, objective):
    prefix = write_tokens(tmp_path)
    common = ["--data", prefix, *TINY, "--batch_size", 8, "--micro_batch_size", 4, "--max_steps", 8,
              "--eval_interval", 3, "--flip", *objective]
    run(*common, "--out", tmp_path / "whole")

    saves = []
    real_save = train.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the process is killed right after the step-6 checkpoint

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(SystemExit, match="130"):
        run(*common, "--out", tmp_path / "cut")
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert load_checkpoint(tmp_path / "cut" / "ckpt.pt")["step"] == 6
    run("--resume", "--out", tmp_path / "cut")
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    torch.testing.assert_close(load_checkpoint(tmp_path / "cut" / "ckpt.pt")["model"],
                               load_checkpoint(tmp_path / "whole" / "ckpt.pt")["model"])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
@pytest.mark.parametrize("task", [[], ["--clf"], ["--bert"]], ids=["pretraining", "fine-tuning", "bert"])
def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path, task):
    prefix = write_tokens(tmp_path)
    common = ["--data", prefix, *TINY, "--batch_size", 8, "--micro_batch_size", 2, "--max_steps", 4,
              "--eval_interval", 4, "--device", "cpu", *task]
    run(*common, "--out", tmp_path / "one")
    result = torchrun(os.path.join(ROOT, "train.py"), *common, "--out", tmp_path / "two")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys()
    np.testing.assert_allclose([two[k] for k in one], [one[k] for k in one], rtol=1e-5)
    torch.testing.assert_close(load_checkpoint(tmp_path / "two" / "ckpt.pt")["model"],
                               load_checkpoint(tmp_path / "one" / "ckpt.pt")["model"], rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
@pytest.mark.parametrize("task, sharded", [([], ["--activation_checkpointing"]), (["--clf"], [])],
                         ids=["pretraining", "fine-tuning"])
def test_fsdp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path, task, sharded):
    prefix = write_tokens(tmp_path)
    common = ["--data", prefix, *TINY, "--batch_size", 8, "--micro_batch_size", 2, "--max_steps", 4,
              "--eval_interval", 2, "--eval_images", 5, "--device", "cpu", *task]  # 5: the ranks' shares differ
    run(*common, "--out", tmp_path / "one")
    result = torchrun(os.path.join(ROOT, "train.py"), *common, *sharded, "--fsdp", "--out", tmp_path / "two")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = evaluations(tmp_path / "one"), evaluations(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) >= 6
    np.testing.assert_allclose([two[k] for k in one], [one[k] for k in one], rtol=1e-5)
    torch.testing.assert_close(parallel.load_weights(str(tmp_path / "two" / "ckpt.dcp"))["model"],
                               load_checkpoint(tmp_path / "one" / "ckpt.pt")["model"], rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_a_killed_fsdp_run_resumes_on_two_or_one_processes_with_the_losses_of_an_uninterrupted_run(tmp_path):
    prefix = write_tokens(tmp_path)
    common = ["--data", prefix, *TINY, "--batch_size", 8, "--micro_batch_size", 2, "--max_steps", 8,
              "--eval_interval", 3, "--flip", "--device", "cpu"]
    run(*common, "--out", tmp_path / "whole")  # one process without sharding: the same losses, as tested above
    killed = torchrun(os.path.join(ROOT, "tests", "killed_train.py"), 2, *common, "--fsdp", "--out", tmp_path / "cut")
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert parallel.read_train_state(str(tmp_path / "cut" / "ckpt.dcp"))["step"] == 6
    shutil.copytree(tmp_path / "cut", tmp_path / "cut_one")
    resumed = torchrun(os.path.join(ROOT, "train.py"), "--resume", "--out", tmp_path / "cut", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run("--resume", "--out", tmp_path / "cut_one")  # one process, the shards of two read into a group of one
    whole = evaluations(tmp_path / "whole")
    for out in ("cut", "cut_one"):
        again = evaluations(tmp_path / out)
        assert again.keys() == whole.keys()
        np.testing.assert_allclose([again[k] for k in whole], [whole[k] for k in whole], rtol=1e-5)
        torch.testing.assert_close(parallel.load_weights(str(tmp_path / out / "ckpt.dcp"))["model"],
                                   load_checkpoint(tmp_path / "whole" / "ckpt.pt")["model"], rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the TF32 switches matter on a GPU only")
def test_a_gpu_run_leaves_the_tf32_switches_as_it_found_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    argv = ["--data", write_tokens(tmp_path), *TINY, "--out", tmp_path / "out", "--batch_size", 8, "--max_steps", 1,
            "--device", "cuda", "--compile", "off"]
    train.main([str(a) for a in argv])
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_activation_checkpointing_changes_no_loss_and_runs_each_block_again_in_the_backward(tmp_path, monkeypatch):
    prefix = write_tokens(tmp_path)
    common = ["--data", prefix, *TINY, "--batch_size", 8, "--micro_batch_size", 4, "--max_steps", 4,
              "--eval_interval", 2]
    calls, block_forward = [], igpt.Block.forward
    monkeypatch.setattr(igpt.Block, "forward", lambda self, *a, **k: calls.append(1) or block_forward(self, *a, **k))
    run(*common, "--out", tmp_path / "plain")
    plain_calls = len(calls)
    run(*common, "--activation_checkpointing", "--out", tmp_path / "recomputed")
    assert len(calls) - plain_calls == plain_calls + 4 * 2 * 2  # once more for each of 4 steps x 2 micro x 2 blocks
    plain, recomputed = evaluations(tmp_path / "plain"), evaluations(tmp_path / "recomputed")
    assert plain.keys() == recomputed.keys()
    np.testing.assert_allclose([recomputed[k] for k in plain], [plain[k] for k in plain], rtol=1e-6)


def test_a_sharded_run_is_resumed_only_sharded(tmp_path):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--micro_batch_size", 8,
        "--max_steps", 1, "--eval_interval", 1, "--fsdp", "--device", "cpu")  # one process: a group of one
    with pytest.raises(SystemExit, match="ckpt.dcp was written with --fsdp: resume it so"):
        run("--resume", "--out", tmp_path / "o", "--no-fsdp", "--max_steps", 2)


def test_eval_only_reads_a_sharded_checkpoint(tmp_path):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--micro_batch_size", 8,
        "--max_steps", 2, "--eval_interval", 2, "--fsdp", "--device", "cpu")
    result = run("--eval_only", "--resume", "--out", tmp_path / "o", "--micro_batch_size", 5)
    weights = parallel.load_weights(str(tmp_path / "o" / "ckpt.dcp"))
    model = IGPT.from_state_dict(IGPTConfig(**weights["config"]), weights["model"])
    with torch.no_grad():
        expected = model(torch.from_numpy(np.load(f"{prefix}_vaX.npy").astype(np.int64)))[1].item()
    assert result["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_run_started_over_in_the_other_kind_replaces_the_old_checkpoint(tmp_path):
    prefix = write_tokens(tmp_path)
    args = ["--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--micro_batch_size", 8,
            "--max_steps", 1, "--eval_interval", 1, "--device", "cpu"]
    run(*args)
    with pytest.raises(SystemExit, match=r"holds a run \(.*ckpt.pt\): pass --resume"):
        run(*args, "--fsdp")
    run(*args, "--fsdp", "--force")
    assert sorted(os.listdir(tmp_path / "o")) == ["ckpt.dcp", "log.jsonl"]


def test_dry_run_prints_the_memory_a_gpu_needs_without_data_and_stops(tmp_path, capsys):
    options = ["--model", "xl", "--n_px", 64, "--fsdp", "--activation_checkpointing", "--micro_batch_size", 4]
    estimate = run(*options, "--dry_run", "--data", tmp_path / "none", "--out", tmp_path / "o")
    assert estimate == parallel.memory_estimate(IGPTConfig.preset("xl", n_px=64), 4, world=1, fsdp=True,
                                                activation_checkpointing=True, compute_bytes=2)
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0] == ("6.81B parameters (60 layers of width 3072), FSDP on 1 GPU with activation checkpointing, "
                        "micro-batch 4 of 4096 tokens; per GPU:")
    assert [line.split() for line in lines[1:6]] == [[part, f"{estimate[part] / 1e9:.1f}", "GB"] for part in
                                                     ("weights", "gradients", "optimizer", "activations", "total")]
    assert not os.path.exists(tmp_path / "o")


def test_dry_run_estimates_a_fresh_model_for_the_datas_images_palette_and_classes(tmp_path):
    prefix = write_tokens(tmp_path, n_px=4, n_vocab=16)  # labels 0..2
    expected = parallel.memory_estimate(IGPTConfig(n_px=4, n_vocab=16, n_classes=3, n_embd=32, n_head=4, n_layer=2),
                                        8, world=1, fsdp=False, activation_checkpointing=False, compute_bytes=2)
    assert run("--dry_run", "--data", prefix, *TINY, "--clf", "--micro_batch_size", 8) == expected


def test_dry_run_estimates_the_model_of_the_checkpoint_it_would_start_from_or_resume(tmp_path, capsys):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--max_steps", 1)
    config = IGPT.from_checkpoint(tmp_path / "o" / "ckpt.pt").config
    expected = parallel.memory_estimate(config, 8, world=1, fsdp=False, activation_checkpointing=False,
                                        compute_bytes=2)
    assert run("--dry_run", "--ckpt", tmp_path / "o" / "ckpt.pt", "--micro_batch_size", 8) == expected
    assert run("--dry_run", "--resume", "--out", tmp_path / "o", "--micro_batch_size", 8) == expected
    assert "(2 layers of width 32)" in capsys.readouterr().out


@pytest.mark.parametrize("n_px", [48, 64])
def test_images_of_48_and_64_pixels_train_with_checkpointed_activations(tmp_path, n_px):
    prefix = write_tokens(tmp_path, n=4, n_px=n_px)
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 2, "--micro_batch_size", 2,
        "--max_steps", 1, "--eval_interval", 1, "--eval_images", 2, "--activation_checkpointing")
    ckpt = load_checkpoint(tmp_path / "o" / "ckpt.pt")
    assert ckpt["config"]["n_px"] == n_px and ckpt["model"]["wpe.weight"].shape[0] == n_px * n_px
    assert losses(tmp_path / "o")[1] == pytest.approx(math.log(16))  # the zero head's uniform guess at every pixel


def test_n_px_other_than_the_datas_is_a_clear_error(tmp_path):
    prefix = write_tokens(tmp_path)
    with pytest.raises(SystemExit, match="--n_px 8, but .* holds 4x4 images"):
        run("--data", prefix, "--out", tmp_path / "o", *TINY, "--n_px", 8)


def test_fine_tuning_trains_a_classifier_beside_the_generative_loss(tmp_path):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "pre", *TINY, "--batch_size", 8, "--micro_batch_size", 8,
        "--max_steps", 2, "--eval_interval", 2)
    run("--data", prefix, "--out", tmp_path / "ft", "--ckpt", tmp_path / "pre" / "ckpt.pt", "--clf",
        "--batch_size", 8, "--micro_batch_size", 8, "--max_steps", 2, "--eval_interval", 2, "--log_interval", 1)
    ckpt = load_checkpoint(tmp_path / "ft" / "ckpt.pt")
    assert ckpt["config"]["n_classes"] == 3 and ckpt["model"]["clf.weight"].abs().sum() > 0
    records = [json.loads(l) for l in open(tmp_path / "ft" / "log.jsonl")]
    assert any("accuracy" in r for r in records)
    # The first step's loss, before any update: the new classifier is zero, so its cross-entropy is log 3, beside
    # gen_weight times the pretrained model's generative loss on the first batch (seed 1337's first 8 images).
    pretrained = IGPT.from_checkpoint(tmp_path / "pre" / "ckpt.pt")
    first = np.random.default_rng([1337, 0]).permutation(32)[:8]
    with torch.no_grad():
        gen_loss = pretrained(torch.from_numpy(np.load(prefix + "_trX.npy")[first].astype(np.int64)))[1].item()
    for gen_weight in (0, 0.5):
        out = tmp_path / f"ft{gen_weight}"
        run("--data", prefix, "--out", out, "--ckpt", tmp_path / "pre" / "ckpt.pt", "--clf",
            "--gen_weight", gen_weight, "--batch_size", 8, "--micro_batch_size", 8, "--max_steps", 1)
        assert losses(out)[1] == pytest.approx(math.log(3) + gen_weight * gen_loss, rel=1e-5)


# ---- the BERT objective ----

def test_a_bert_run_on_shapes_predicts_masked_pixels_far_better_than_their_colour_frequencies(tmp_path):
    prefix = str(tmp_path / "shapes")
    quantize.main(["shapes", "--test", "shapes", "--num_images", "200", "--n_px", "8", "--k", "8", "--device", "cpu",
                   "--out", prefix])
    X, _ = load_tokens(prefix, "tr")
    p = np.bincount(X.ravel()) / X.size
    unigram_entropy = -(p[p > 0] * np.log(p[p > 0])).sum()  # the best loss without looking at the image: ~2 nats
    result = run("--data", prefix, "--out", tmp_path / "o", "--bert", *TINY, "--batch_size", 16,
                 "--micro_batch_size", 16, "--max_steps", 80, "--eval_interval", 80, "--warmup_steps", 10)
    assert IGPT.from_checkpoint(tmp_path / "o" / "ckpt.pt").config.bert
    assert result["va_loss"] < unigram_entropy / 2


def test_bert_evaluation_reads_each_image_under_its_fixed_mask(tmp_path):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--bert", "--bert_mask_prob", 0.3, "--batch_size", 8,
        "--micro_batch_size", 8, "--max_steps", 2, "--eval_interval", 2)
    model = IGPT.from_checkpoint(tmp_path / "o" / "ckpt.pt")
    assert model.config.bert_mask_prob == 0.3
    x = torch.from_numpy(np.load(f"{prefix}_vaX.npy").astype(np.int64))
    with torch.no_grad():
        expected = model(x, mask=fixed_mask(range(len(x)), model.config))[1].item()
    for micro_batch_size in (5, 32):  # batches of any size, in another run with another seed: the same masks
        result = run("--eval_only", "--ckpt", tmp_path / "o" / "ckpt.pt", "--data", prefix, "--micro_batch_size",
                     micro_batch_size, "--seed", 7)
        assert result["loss"] == pytest.approx(expected, rel=1e-5)


def test_fine_tuning_a_bert_model_adds_the_classifier_to_its_masked_loss(tmp_path):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "pre", *TINY, "--bert", "--batch_size", 8, "--micro_batch_size", 8,
        "--max_steps", 2, "--eval_interval", 2)
    run("--data", prefix, "--out", tmp_path / "ft", "--ckpt", tmp_path / "pre" / "ckpt.pt", "--clf",
        "--gen_weight", 0.5, "--batch_size", 8, "--micro_batch_size", 8, "--max_steps", 1)
    ckpt = load_checkpoint(tmp_path / "ft" / "ckpt.pt")
    assert ckpt["config"]["bert"] and ckpt["config"]["n_classes"] == 3
    # Before any update the classifier is zero (log 3), beside half the BERT loss of the first batch under the
    # first step's masks.
    pretrained = IGPT.from_checkpoint(tmp_path / "pre" / "ckpt.pt")
    first = np.random.default_rng([1337, 0]).permutation(32)[:8]
    x = torch.from_numpy(np.load(prefix + "_trX.npy")[first].astype(np.int64))
    with torch.no_grad():
        gen_loss = pretrained(x, mask=train.training_masks(pretrained.config, 1337, 0, 8))[1].item()
    assert losses(tmp_path / "ft")[1] == pytest.approx(math.log(3) + 0.5 * gen_loss, rel=1e-5)


def test_training_masks_are_drawn_from_the_seed_and_step_at_the_masking_rate():
    config = IGPTConfig(n_px=8, bert=True, bert_mask_prob=0.2)
    masks = train.training_masks(config, 1, 5, 300)
    assert masks.shape == (300, 64) and masks.dtype == torch.bool
    assert torch.equal(masks, train.training_masks(config, 1, 5, 300))
    assert not torch.equal(masks, train.training_masks(config, 1, 6, 300))
    assert torch.equal(masks, torch.from_numpy(np.random.default_rng([1, 5, 2]).random((300, 64)) < 0.2))
    assert abs(masks.float().mean().item() - 0.2) < 0.01
    assert train.training_masks(IGPTConfig(n_px=8), 1, 5, 300) is None


@pytest.mark.parametrize("args, message", [
    (["--bert_mask_prob", "0.2"], "--bert_mask_prob is for BERT models: add --bert"),
    (["--bert", "--ckpt", "{ar}"], "is an autoregressive model; a BERT run starts from a BERT checkpoint"),
])
def test_bert_options_that_do_not_fit_the_model_are_refused(tmp_path, args, message):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "ar", *TINY, "--batch_size", 8, "--micro_batch_size", 8,
        "--max_steps", 1, "--eval_interval", 1)
    args = [a.format(ar=tmp_path / "ar" / "ckpt.pt") for a in args]
    with pytest.raises(SystemExit, match=message):
        run("--data", prefix, "--out", tmp_path / "o", *TINY, *args)


def test_eval_only_reports_the_mean_loss_of_the_split(tmp_path):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--micro_batch_size", 8,
        "--max_steps", 3, "--eval_interval", 3)
    result = run("--eval_only", "--ckpt", tmp_path / "o" / "ckpt.pt", "--data", prefix,
                 "--micro_batch_size", 5)
    from igpt import IGPT
    model = IGPT.from_checkpoint(tmp_path / "o" / "ckpt.pt")
    x = torch.from_numpy(np.load(f"{prefix}_vaX.npy").astype(np.int64))
    with torch.no_grad():
        assert result["loss"] == pytest.approx(model(x)[1].item(), rel=1e-5)


def test_eval_only_with_resume_evaluates_the_runs_weights_not_those_it_started_from(tmp_path):
    prefix = write_tokens(tmp_path)
    small = [*TINY, "--batch_size", 8, "--micro_batch_size", 8]
    run("--data", prefix, "--out", tmp_path / "a", *small, "--max_steps", 1, "--eval_interval", 1)
    run("--data", prefix, "--out", tmp_path / "b", *small, "--ckpt", tmp_path / "a" / "ckpt.pt", "--max_steps", 4,
        "--eval_interval", 4)
    of = lambda ckpt: run("--eval_only", "--ckpt", ckpt, "--data", prefix)["loss"]
    resumed = run("--eval_only", "--resume", "--out", tmp_path / "b")["loss"]
    assert resumed == pytest.approx(of(tmp_path / "b" / "ckpt.pt"), rel=1e-6)
    assert resumed != pytest.approx(of(tmp_path / "a" / "ckpt.pt"), rel=1e-3)


def test_an_existing_run_is_not_overwritten_without_force(tmp_path):
    prefix = write_tokens(tmp_path)
    args = ["--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--micro_batch_size", 8,
            "--max_steps", 1, "--eval_interval", 1]
    run(*args)
    before = (tmp_path / "o" / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="--resume .* or --force"):
        run(*args)
    assert (tmp_path / "o" / "ckpt.pt").read_bytes() == before
    run(*args, "--force", "--seed", 7)
    assert (tmp_path / "o" / "ckpt.pt").read_bytes() != before


def test_a_run_started_over_with_force_keeps_the_old_runs_log_until_its_own_first_checkpoint(tmp_path, monkeypatch):
    prefix = write_tokens(tmp_path)
    args = ["--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--micro_batch_size", 8,
            "--max_steps", 2, "--eval_interval", 2]
    run(*args)
    old_log, old_ckpt = (tmp_path / "o" / "log.jsonl").read_text(), (tmp_path / "o" / "ckpt.pt").read_bytes()

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_checkpoint", killed)  # killed as it was to write its first checkpoint
    with pytest.raises(SystemExit) as stopped:
        run(*args, "--force", "--seed", 7)
    assert stopped.value.code == 130
    assert (tmp_path / "o" / "log.jsonl").read_text() == old_log  # beside the checkpoint it belongs to
    assert (tmp_path / "o" / "ckpt.pt").read_bytes() == old_ckpt
    monkeypatch.undo()
    run(*args, "--force", "--seed", 7, "--max_steps", 3, "--eval_interval", 3)
    assert sorted(losses(tmp_path / "o")) == [1, 2, 3] and (tmp_path / "o" / "log.jsonl").read_text() != old_log


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    prefix = write_tokens(tmp_path)
    args = ["--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--micro_batch_size", 8,
            "--max_steps", 6, "--eval_interval", 2, "--log_interval", 100]  # the loss is first read at step 4
    real_forward = train.IGPT.forward
    calls = []

    def poisoned(self, tokens, mask=None):  # the third training forward, step 3's, returns a NaN loss
        calls.extend([1] if self.training else [])
        logits, loss = real_forward(self, tokens, mask)
        return logits, loss * float("nan") if len(calls) == 3 and self.training else loss

    monkeypatch.setattr(train.IGPT, "forward", poisoned)
    with pytest.raises(SystemExit, match="step 3: the loss is nan"):
        run(*args)
    ckpt = load_checkpoint(tmp_path / "o" / "ckpt.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_weights_made_non_finite_by_an_update_are_never_saved(tmp_path, monkeypatch):
    prefix = write_tokens(tmp_path)
    args = ["--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--max_steps", 6,
            "--ckpt_interval", 1]
    real_step = torch.optim.AdamW.step
    steps = []

    def poisoning_step(self, *a, **k):  # the third update turns a weight into nan; its loss was finite
        result = real_step(self, *a, **k)
        steps.append(1)
        if len(steps) == 3:
            self.param_groups[0]["params"][0].data[0, 0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    with pytest.raises(SystemExit, match=r"holds inf or nan after step 3; .* last good checkpoint is .*ckpt\.pt "
                                         r"\(step 2\): resume it with a lower --learning_rate"):
        run(*args)
    ckpt = load_checkpoint(tmp_path / "o" / "ckpt.pt")
    assert ckpt["step"] == 2
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert run("--resume", "--out", tmp_path / "o", "--learning_rate", 1e-3)["step"] == 6


def test_checkpoints_come_at_their_own_interval_as_well(tmp_path, monkeypatch):
    prefix = write_tokens(tmp_path)
    steps, real_save = [], train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda *a, **k: steps.append(k["step"]) or real_save(*a, **k))
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--max_steps", 7,
        "--eval_interval", 6, "--ckpt_interval", 4)
    assert steps == [4, 6, 7]


def test_resume_refuses_options_that_would_change_the_run_and_says_when_it_is_done(tmp_path, capsys):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--max_steps", 2)
    for flag, value in [("--batch_size", 4), ("--n_layer", 3), ("--ckpt", tmp_path / "o" / "ckpt.pt")]:
        with pytest.raises(SystemExit, match=f"with its own {flag} .* {flag} .* would change it: drop the flag"):
            run("--resume", "--out", tmp_path / "o", flag, value)
    assert run("--resume", "--out", tmp_path / "o", "--batch_size", 8)["step"] == 2  # the same value is no change
    assert "at step 2, the run's --max_steps 2: nothing to train; give a larger --max_steps" in capsys.readouterr().out
    assert run("--resume", "--out", tmp_path / "o", "--max_steps", 3)["step"] == 3


def test_a_resumed_run_trains_with_the_adam_options_given_now(tmp_path):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--max_steps", 1)
    run("--resume", "--out", tmp_path / "o", "--max_steps", 2, "--beta2", 0.99, "--weight_decay", 0.1)
    groups = load_checkpoint(tmp_path / "o" / "ckpt.pt")["optimizer"]["param_groups"]
    assert [(tuple(g["betas"]), g["weight_decay"]) for g in groups] == [((0.9, 0.99), 0.1), ((0.9, 0.99), 0.0)]


def test_a_run_started_from_a_checkpoint_resumes_without_that_file(tmp_path):
    prefix = write_tokens(tmp_path)
    small = [*TINY, "--batch_size", 8, "--micro_batch_size", 8]
    run("--data", prefix, "--out", tmp_path / "a", *small, "--max_steps", 1)
    run("--data", prefix, "--out", tmp_path / "b", *small, "--ckpt", tmp_path / "a" / "ckpt.pt", "--clf",
        "--max_steps", 2, "--eval_interval", 2)
    shutil.rmtree(tmp_path / "a")
    assert run("--resume", "--out", tmp_path / "b", "--max_steps", 3)["step"] == 3


def test_a_run_from_a_fine_tuned_checkpoint_without_clf_drops_its_classifier(tmp_path):
    prefix = write_tokens(tmp_path)
    small = [*TINY, "--batch_size", 8, "--micro_batch_size", 8, "--max_steps", 1]
    run("--data", prefix, "--out", tmp_path / "ft", *small, "--clf")
    run("--data", prefix, "--out", tmp_path / "gen", *small, "--ckpt", tmp_path / "ft" / "ckpt.pt")
    model = IGPT.from_checkpoint(tmp_path / "gen" / "ckpt.pt")
    assert model.config.n_classes == 0 and model.clf is None  # so DDP finds no weight without a gradient


def test_eval_only_scores_a_fine_tuned_model_with_its_own_classes_whatever_the_split_holds(tmp_path):
    prefix = write_tokens(tmp_path)  # labels 0..2
    run("--data", prefix, "--out", tmp_path / "ft", *TINY, "--batch_size", 8, "--max_steps", 8, "--clf")
    np.save(f"{prefix}_vaY.npy", np.zeros(32, dtype=np.int64))  # a split of one class
    result = run("--eval_only", "--resume", "--out", tmp_path / "ft", "--data", prefix)
    model = IGPT.from_checkpoint(tmp_path / "ft" / "ckpt.pt")
    with torch.no_grad():
        logits, _ = model.classify(torch.from_numpy(np.load(f"{prefix}_vaX.npy").astype(np.int64)))
    predicted_0 = (logits.argmax(-1) == 0).float().mean().item()  # over all three classes
    assert 0 < predicted_0 < 1 and result["accuracy"] == pytest.approx(predicted_0)


def test_eval_only_with_clf_refuses_a_model_without_a_classifier(tmp_path):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--max_steps", 1)
    with pytest.raises(SystemExit, match=r"--eval_only --clf: .*ckpt\.pt has no classifier to score; fine-tune one "
                                         r"first \(train\.py --clf --ckpt .*\), or drop --clf"):
        run("--eval_only", "--clf", "--ckpt", tmp_path / "o" / "ckpt.pt", "--data", prefix)


def test_resume_refuses_a_checkpoint_of_options_it_does_not_know(tmp_path):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--max_steps", 1)
    path = tmp_path / "o" / "ckpt.pt"
    ckpt = load_checkpoint(path)
    extra = {k: v for k, v in ckpt.items() if k not in ("config", "model", "palette", "checksums")}
    extra["train_config"] = {**extra["train_config"], "objective": "bert"}  # from a version with more options
    save_checkpoint(path, IGPT.from_checkpoint(path), palette=ckpt["palette"], **extra)
    with pytest.raises(SystemExit, match=r"options this train\.py does not know \(\['objective'\]\)"):
        run("--resume", "--out", tmp_path / "o", "--max_steps", 2)


def test_resume_refuses_a_checkpoint_with_weights_but_no_training_state(tmp_path):
    (tmp_path / "o").mkdir()
    save_checkpoint(tmp_path / "o" / "ckpt.pt", IGPT(IGPTConfig(n_px=4, n_vocab=16, n_embd=32, n_head=4, n_layer=2)))
    with pytest.raises(SystemExit, match=r"holds a model but no training state .*: start a new run from its weights "
                                         r"with --ckpt"):
        run("--resume", "--out", tmp_path / "o")


def test_resume_refuses_to_change_the_objective(tmp_path):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--max_steps", 1, "--clf")
    with pytest.raises(SystemExit, match="with its own --gen_weight 1.0; --gen_weight 0.5 would change it"):
        run("--resume", "--out", tmp_path / "o", "--gen_weight", 0.5, "--max_steps", 2)


def test_sizes_other_than_the_ckpts_are_refused(tmp_path):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "a", *TINY, "--batch_size", 8, "--max_steps", 1)
    with pytest.raises(SystemExit, match=r"--n_embd 64: .*ckpt\.pt is a model of n_embd 32, which a run from its "
                                         "weights keeps; drop the flag"):
        run("--data", prefix, "--out", tmp_path / "b", *TINY, "--n_embd", 64, "--ckpt", tmp_path / "a" / "ckpt.pt")


def test_a_resumed_run_keeps_a_log_whose_last_line_a_kill_cut_short(tmp_path):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--max_steps", 2)
    with open(tmp_path / "o" / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    run("--resume", "--out", tmp_path / "o", "--max_steps", 3)
    assert sorted(losses(tmp_path / "o")) == [1, 2, 3]


def test_the_micro_batch_is_the_largest_divisor_of_each_processs_share_up_to_32():
    for batch, world in [(64, 1), (16, 1), (48, 1), (100, 1), (64, 4), (66, 2), (2 * 37, 1)]:
        share = batch // world  # by brute force: the largest d <= 32 that splits the share evenly
        expected = next(d for d in range(32, 0, -1) if share % d == 0)
        assert train.micro_batch(train.TrainConfig(batch_size=batch), world) == expected
    assert train.micro_batch(train.TrainConfig(batch_size=64, micro_batch_size=8), 2) == 8
    with pytest.raises(SystemExit, match="multiple of --micro_batch_size 24 x 1"):
        train.micro_batch(train.TrainConfig(batch_size=64, micro_batch_size=24), 1)


def test_log_lines_give_the_time_per_step_and_what_is_left_after_the_first(tmp_path, capsys):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--max_steps", 4, "--log_interval", 2)
    lines = [l for l in capsys.readouterr().out.splitlines()
             if l.startswith("step ") and "loss" in l and "va loss" not in l]
    assert [l.split(":")[0] for l in lines] == ["step 1/4", "step 2/4", "step 4/4"]
    assert all(" a step, " in l for l in lines)
    # the first step's time holds the warm-up, so it predicts nothing about the rest
    assert lines[0].endswith(", the time to go from the next line (this step warmed up)")  # on the CPU: no compile
    assert re.search(r", \S+ to go$", lines[1]) and lines[2].endswith(", 0ms to go")


def test_a_folder_with_a_log_but_no_checkpoint_is_not_overwritten_without_force(tmp_path):
    prefix = write_tokens(tmp_path)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(SystemExit, match="log.jsonl.*--resume .* or --force"):
        run("--data", prefix, "--out", tmp_path / "o", *TINY, "--max_steps", 1)
    assert (tmp_path / "o" / "log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_a_checkpoint_of_another_palette_is_refused_naming_both(tmp_path):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "pre", *TINY, "--batch_size", 8, "--max_steps", 1)
    os.makedirs(tmp_path / "other")
    other = write_tokens(tmp_path / "other", seed=1)  # the same shapes, another palette
    for args in (["--clf", "--out", tmp_path / "ft"], ["--eval_only"]):
        with pytest.raises(SystemExit, match=r"palettes of .*other/toy_palette\.npy \(16 colours\) and "
                                             r".*pre/ckpt\.pt \(16 colours\) differ"):
            run("--data", other, "--ckpt", tmp_path / "pre" / "ckpt.pt", *args)
    np.save(f"{other}_palette.npy", np.zeros((8, 3), np.float32))
    with pytest.raises(SystemExit, match=r"toy_palette\.npy has 8 colours but the model has 16 tokens"):
        run("--data", other, "--ckpt", tmp_path / "pre" / "ckpt.pt", "--eval_only")


def start(*args):
    """train.py in a process of its own, its output read line by line."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_step(process, step):
    for line in process.stdout:
        if line.startswith(f"step {step}/"):
            return
    raise AssertionError(f"the run ended before step {step}: {process.stderr.read()[-2000:]}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_run_after_its_step_with_a_checkpoint_and_one_line(tmp_path, sig):
    prefix = write_tokens(tmp_path)
    out = tmp_path / "o"
    process = start("--data", prefix, "--out", out, *TINY, "--batch_size", 8, "--max_steps", 100000,
                    "--eval_interval", 100000, "--device", "cpu")
    wait_for_step(process, 3)
    process.send_signal(sig)
    process.stdout.read()
    err = process.stderr.read()
    assert process.wait(timeout=120) == 128 + sig
    step = load_checkpoint(out / "ckpt.pt")["step"]
    assert err.splitlines() == [f"train.py: stopped by {sig.name} after step {step} and wrote {out}/ckpt.pt; "
                                f"continue with: python train.py --resume --out {out}"]
    assert run("--resume", "--out", out, "--max_steps", step + 1)["step"] == step + 1


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_under_ddp_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    prefix = write_tokens(tmp_path)
    out = tmp_path / "o"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        ranks.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "train.py"), "--data", prefix, "--out", str(out), *map(str, TINY),
             "--batch_size", "8", "--max_steps", "100000", "--eval_interval", "100000", "--device", "cpu"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    wait_for_step(ranks[0], 3)
    ranks[1].send_signal(signal.SIGTERM)  # only the second rank is told
    # a rank that stopped at another step would leave the other waiting in its next all-reduce until the timeout
    outputs = [(p.communicate(timeout=120), p.returncode) for p in ranks]
    assert [code for _, code in outputs] == [128 + signal.SIGTERM] * 2
    step = load_checkpoint(out / "ckpt.pt")["step"]
    assert outputs[0][0][1].splitlines()[-1].startswith(f"train.py: stopped by SIGTERM after step {step} and wrote")
    assert "Traceback" not in outputs[0][0][1] + outputs[1][0][1]


def test_token_values_outside_the_palette_are_a_clear_error(tmp_path):
    prefix = write_tokens(tmp_path)
    x = np.load(f"{prefix}_trX.npy")
    x[3, 5] = 16
    np.save(f"{prefix}_trX.npy", x)
    with pytest.raises(SystemExit, match=r"token values span 0..16 but the palette has 16 colours"):
        run("--data", prefix, "--out", tmp_path / "o", *TINY)


def test_images_of_the_wrong_length_are_a_clear_error(tmp_path):
    prefix = write_tokens(tmp_path)
    run("--data", prefix, "--out", tmp_path / "o", *TINY, "--batch_size", 8, "--micro_batch_size", 8,
        "--max_steps", 1, "--eval_interval", 1)
    os.makedirs(tmp_path / "big")
    other = write_tokens(tmp_path / "big", n_px=5)
    with pytest.raises(SystemExit, match="model of 4x4 images but the data has 5x5"):
        run("--data", other, "--out", tmp_path / "o2", "--ckpt", tmp_path / "o" / "ckpt.pt")


def test_a_missing_data_path_names_the_file(tmp_path):
    with pytest.raises((SystemExit, FileNotFoundError), match="nothing_trX.npy"):
        run("--data", tmp_path / "nothing", "--out", tmp_path / "o")


def test_config_file_overrides_defaults_and_flags_override_the_file(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("# overrides\nbatch_size = 16\nlearning_rate = 1e-4  # small\ndata = 'x'\n")
    cfg, _ = train.parse_config(["--config", str(cfg_file), "--learning_rate", "0.5"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.data) == (16, 0.5, "x")
    cfg_file.write_text("not_an_option = 3\n")
    with pytest.raises(SystemExit, match="c.py:1"):
        train.parse_config(["--config", str(cfg_file)])


@pytest.mark.parametrize("line, message", [
    ("batch_size = '128'", r"c\.py:1: batch_size = '128': give an int, as its flag takes"),
    ("flip = 1", r"c\.py:1: flip = 1: give a bool"),
    ("eval_split = 'tr'", r"c\.py:1: eval_split = 'tr': choose from va, te"),
])
def test_a_config_files_value_of_the_wrong_type_or_choice_is_refused(tmp_path, line, message):
    (tmp_path / "c.py").write_text(line + "\n")
    with pytest.raises(SystemExit, match=message):
        train.parse_config(["--config", str(tmp_path / "c.py")])


def test_a_hash_inside_a_config_files_quoted_value_is_not_a_comment(tmp_path):
    (tmp_path / "c.py").write_text("out = 'runs/#1'  # the first\n")
    assert train.parse_config(["--config", str(tmp_path / "c.py")])[0].out == "runs/#1"


def test_a_config_files_int_is_taken_where_a_float_goes():
    assert train._typed(1, float, None, "x") == 1.0 and type(train._typed(1, float, None, "x")) is float


@pytest.mark.parametrize("flag, value, message", [
    ("--log_interval", 0, "--log_interval 0: it must be at least 1"),
    ("--eval_interval", 0, "--eval_interval 0: it must be at least 1"),
    ("--eval_images", -1, "--eval_images -1: it cannot be negative"),
    ("--seed", -1, "--seed -1: it cannot be negative"),
    ("--gen_weight", -5, "--gen_weight -5.0: it cannot be negative"),
    ("--grad_clip", "nan", "--grad_clip nan: give a finite number"),
    ("--learning_rate", -1, "--learning_rate -1.0: it must be above 0"),
    ("--min_lr", 1, r"--min_lr 1.0 is above --learning_rate 0.003: the cosine decays from the peak down to --min_lr"),
    ("--beta1", 1.5, r"--beta1 1.5: Adam's decay rates lie in \[0, 1\)"),
])
def test_intervals_counts_and_rates_a_run_cannot_use_are_refused_before_any_work(tmp_path, flag, value, message):
    with pytest.raises(SystemExit, match=message):
        run("--data", tmp_path / "missing", "--out", tmp_path / "o", "--clf", flag, value)


def test_gen_weight_without_clf_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="--gen_weight weighs the generative loss beside the classifier of --clf: "
                                         "add --clf, or drop the flag"):
        run("--data", tmp_path / "missing", "--out", tmp_path / "o", "--gen_weight", 3)


def test_help_lists_every_option_with_its_default():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    for f in train.fields(train.TrainConfig):
        assert f"--{f.name}" in result.stdout
        assert f"(default: {f.default!r})" in result.stdout



def test_help_gives_an_options_comment_whole_where_it_runs_onto_a_second_line():
    comments = train._field_comments()
    assert comments["crop"].endswith("its edges mirrored into the gap (0: none)")
    assert comments["grad_clip"] == "max global gradient norm; 0 disables"  # the section's heading below is not its


def test_a_run_the_estimate_says_cannot_fit_is_refused_in_one_line_unless_no_memory_check(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("GPU", (), {"total_memory": 1e9}))
    config, cuda = IGPTConfig.preset("l"), torch.device("cuda")
    cfg, _ = train.parse_config(["--micro_batch_size", "32"])
    with pytest.raises(SystemExit, match=r"^this run cannot fit: .* --no-memory_check tries the run anyway\)$"):
        train.check_memory(cfg, config, 1, cuda)
    cfg, _ = train.parse_config(["--micro_batch_size", "32", "--no-memory_check"])
    assert train.check_memory(cfg, config, 1, cuda) is None

def test_learning_rate_warms_up_linearly_then_decays_along_a_cosine_to_min_lr():
    cfg = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert train.lr_at(0, cfg) == pytest.approx(0.1)
    assert train.lr_at(9, cfg) == pytest.approx(1.0)
    assert train.lr_at(60, cfg) == pytest.approx(0.55)
    assert train.lr_at(35, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))  # a cosine, not a line
    assert train.lr_at(110, cfg) == pytest.approx(0.1)


def test_batches_cover_each_epoch_once_in_a_seeded_order():
    b = train.Batches(10, 5, seed=3)
    first = np.concatenate([b.next(), b.next()])
    assert sorted(first) == list(range(10)) and b.state() == {"epoch": 0, "cursor": 10}
    again = train.Batches(10, 5, seed=3)
    assert np.array_equal(np.concatenate([again.next(), again.next()]), first)
    assert np.array_equal(b.next(), np.random.default_rng([3, 1]).permutation(10)[:5])
    assert b.state() == {"epoch": 1, "cursor": 5}


def test_flips_reverse_each_row_of_the_image():
    X = np.arange(2 * 9, dtype=np.uint16).reshape(2, 9)  # two 3x3 images
    x = train.get_micro_batch(X, np.array([1, 0]), 3, np.array([True, False]), None, torch.device("cpu"))
    assert x.tolist() == [[11, 10, 9, 14, 13, 12, 17, 16, 15], list(range(9))]


def test_crops_shift_each_image_and_mirror_its_edges_into_the_gap():
    X = np.arange(2 * 16, dtype=np.uint16).reshape(2, 16)  # two 4x4 images
    shifts = np.array([[1, -2], [0, 0]])  # the first moved down one row and left two columns
    x = train.get_micro_batch(X, np.array([0, 1]), 4, None, shifts, torch.device("cpu"))
    image = np.arange(16).reshape(4, 4)
    padded = np.pad(image, 3, mode="reflect")  # numpy's mirror: the pixel at -1 is the one at 1
    expected = padded[3 - 1:3 - 1 + 4, 3 + 2:3 + 2 + 4]
    assert x[0].reshape(4, 4).tolist() == expected.tolist() and x[1].tolist() == list(range(16, 32))


def test_a_run_with_crops_trains_on_other_images_and_resumes_only_with_them(tmp_path):
    prefix = write_tokens(tmp_path)
    common = ["--data", prefix, *TINY, "--batch_size", 8, "--max_steps", 2, "--eval_interval", 2]
    run(*common, "--out", tmp_path / "plain")
    run(*common, "--out", tmp_path / "crops", "--crop", 1)
    assert losses(tmp_path / "plain")[1] == losses(tmp_path / "crops")[1]  # the same start
    assert losses(tmp_path / "plain")[2] != losses(tmp_path / "crops")[2]  # other images in step 1
    with pytest.raises(SystemExit, match="--crop"):
        run(*common, "--out", tmp_path / "crops", "--resume", "--crop", 0, "--max_steps", 3)


def test_a_crop_as_large_as_the_image_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--crop 4: a shift must lie in 0..3"):
        run("--data", write_tokens(tmp_path), *TINY, "--out", tmp_path / "out", "--crop", 4)
