"""pipeline.py: the stages chain through their files, the summary keeps every figure, reruns are explicit."""
import json
import os

import numpy as np
import pytest
import torch

import pipeline
from igpt import IGPT
from data import load_tokens, make_shapes

TINY = {
    "quantize": ["shapes", "--test", "shapes", "--num_images", "60", "--n_px", "4", "--k", "8"],
    "train": ["--n_layer", "2", "--n_embd", "16", "--n_head", "2", "--batch_size", "8", "--micro_batch_size", "8",
              "--max_steps", "3", "--warmup_steps", "1", "--eval_interval", "3", "--log_interval", "1"],
    "sample": ["--num_samples", "2"],
    "complete": ["--num_prime", "2", "--num_samples", "2"],
    "probe": ["--Cs", "1", "--baseline"],
}


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(pipeline.RECIPES, "tiny", TINY)
    return lambda *args: pipeline.main(["--recipe", "tiny", "--device", "cpu", *map(str, args)])


def test_every_stage_runs_on_the_files_of_the_one_before(tiny, tmp_path):
    out = tmp_path / "run"
    summary = tiny("--out", out)
    assert list(summary) == ["recipe", "quantize", "train", "evaluate", "sample", "complete", "probe"]  # no finetune
    model = IGPT.from_checkpoint(out / "train" / "ckpt.pt")
    teX, _ = load_tokens(str(out / "data" / "tiny"), "te")
    with torch.no_grad():
        test_loss = model(torch.from_numpy(teX.astype(np.int64)))[1].item()
    assert summary["evaluate"]["loss"] == pytest.approx(test_loss, rel=1e-5)
    assert np.load(out / "samples.npy").shape == (2, 16)
    completions = np.load(out / "completions.npy")
    np.testing.assert_array_equal(completions[:, :8], np.repeat(teX[:2, :8], 2, axis=0))  # n_px/2 rows kept
    rows = json.load(open(out / "probe" / "probe.json"))["rows"]
    best = max(rows, key=lambda r: r["val_acc"])  # the layer chosen on validation, and its test accuracy
    assert (summary["probe"]["best_layer"], summary["probe"]["best_test_acc"]) == (best["layer"], best["test_acc"])
    assert summary["probe"]["test_acc_by_layer"] == {r["layer"]: r["test_acc"] for r in rows}
    pixels = json.load(open(out / "probe" / "probe.json"))["pixels"]
    assert summary["probe"]["pixels_test_acc"] == pixels["test_acc"]  # the baseline, beside the best layer
    assert json.load(open(out / "summary.json")) == json.loads(json.dumps(summary))


def test_a_recipe_with_finetune_flags_fine_tunes_its_model_and_scores_it_on_the_test_split(monkeypatch, tmp_path):
    recipe = {**TINY, "finetune": ["--batch_size", "8", "--max_steps", "2", "--warmup_steps", "1",
                                   "--eval_split", "te", "--eval_interval", "2"]}
    monkeypatch.setitem(pipeline.RECIPES, "tuned", recipe)
    out = tmp_path / "run"
    summary = pipeline.main(["--recipe", "tuned", "--device", "cpu", "--out", str(out)])
    assert list(summary) == ["recipe", *pipeline.STAGES]
    tuned = IGPT.from_checkpoint(out / "finetune" / "ckpt.pt")
    assert tuned.config.n_classes == 10 and summary["finetune"]["step"] == 2  # the ten shapes
    teX, teY = load_tokens(str(out / "data" / "tuned"), "te")
    with torch.no_grad():  # by hand: the fine-tuned model on every test image
        clf_logits, gen_loss = tuned.classify(torch.from_numpy(teX.astype(np.int64)))
    assert summary["finetune"]["te_loss"] == pytest.approx(gen_loss.item(), rel=1e-5)
    assert summary["finetune"]["accuracy"] == pytest.approx((clf_logits.argmax(-1).numpy() == teY).mean())


def test_the_finetune_stage_is_refused_for_a_recipe_without_it(tiny, tmp_path, capsys):
    summary = tiny("--out", tmp_path / "run")
    assert "finetune" not in summary  # not among a recipe's stages unless it gives flags
    with pytest.raises(SystemExit):
        tiny("--out", tmp_path / "run", "--stages", "finetune")
    assert "the tiny recipe has no finetune stage" in capsys.readouterr().err


def test_extra_flags_come_after_the_recipes_and_override_them(tiny, tmp_path):
    summary = tiny("--out", tmp_path / "run", "--stages", "quantize,train", "--extra", "train=--max_steps 2",
                   "--extra", "train=--warmup_steps 2")
    assert summary["train"]["step"] == 2  # the recipe's --max_steps 3, then 2
    argv = summary["train"]["argv"]
    values = lambda flag: [argv[i + 1] for i, a in enumerate(argv) if a == flag]
    assert values("--max_steps") == ["3", "2"] and values("--warmup_steps") == ["1", "2"]
    assert argv.index("--warmup_steps", argv.index("--warmup_steps") + 1) < argv.index("--data")  # paths last


def test_extra_flags_for_no_stage_are_refused(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tiny("--out", tmp_path / "run", "--extra", "training=--max_steps 2")
    assert "--extra 'training=--max_steps 2': give STAGE=FLAGS" in capsys.readouterr().err


def test_rerunning_a_stage_needs_force_and_keeps_the_other_figures(tiny, tmp_path):
    out = tmp_path / "run"
    first = tiny("--out", out)
    with pytest.raises(SystemExit, match="samples.png exists"):
        tiny("--out", out, "--stages", "sample")
    (out / "samples.png").unlink()
    (out / "samples.npy").write_bytes(b"stale")
    again = tiny("--out", out, "--stages", "sample", "--force")
    assert again["train"] == json.loads(json.dumps(first["train"]))
    assert (out / "samples.png").exists() and np.load(out / "samples.npy").shape == (2, 16)


def test_retraining_drops_the_figures_made_from_the_earlier_model(tiny, tmp_path):
    out = tmp_path / "run"
    tiny("--out", out)
    again = tiny("--out", out, "--stages", "train", "--force")
    assert list(again) == ["recipe", "quantize", "train"]
    assert list(json.load(open(out / "summary.json"))) == ["recipe", "quantize", "train"]


def test_a_rerun_ends_with_the_runs_total_and_its_own_stages_time(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    tiny("--out", out)
    capsys.readouterr()
    again = tiny("--out", out, "--stages", "sample", "--force")
    total = sum(again[s]["wall_seconds"] for s in pipeline.STAGES if s in again)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"    total: {total:.0f} s (this call's stages: {again['sample']['wall_seconds']:.0f} s)"


@pytest.mark.parametrize("text, why", [("{not json", "Expecting property name"), ("[1, 2]", "not a JSON object")])
def test_a_summary_that_is_not_one_is_refused_and_kept(tiny, tmp_path, text, why):
    (tmp_path / "summary.json").write_text(text)
    with pytest.raises(SystemExit, match=f"summary.json is not a summary \\({why}.*move it away"):
        tiny("--out", tmp_path, "--stages", "quantize")
    assert os.listdir(tmp_path) == ["summary.json"] and (tmp_path / "summary.json").read_text() == text


def test_a_folder_of_another_recipes_run_is_refused(tiny, tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"recipe": "shapes", "train": {"wall_seconds": 1.0}}))
    with pytest.raises(SystemExit, match="holds a run of the shapes recipe: choose another --out for tiny"):
        tiny("--out", tmp_path, "--stages", "quantize")
    assert os.listdir(tmp_path) == ["summary.json"]


def test_a_recipe_that_reads_a_dataset_names_the_missing_source(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--recipe", "cifar10", "--source", str(tmp_path / "nope.zip"), "--out", str(tmp_path)])
    assert "--source" in capsys.readouterr().err and not os.listdir(tmp_path)


def test_unknown_stages_are_refused(capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--stages", "quantize,trian"])
    assert "unknown stage(s) ['trian']" in capsys.readouterr().err


@pytest.mark.parametrize("stages", ["quantize,train,quantize", "probe,train", "train,quantize", "sample,sample"])
def test_stages_repeated_or_reading_what_a_later_one_makes_are_refused_before_any_work(stages, tmp_path, capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--stages", stages, "--out", str(tmp_path / "run")])
    assert "give each stage once, quantize and train first, in that order" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_stages_after_training_may_come_in_any_order(tiny, tmp_path):
    tiny("--out", tmp_path / "run", "--stages", "quantize,train")
    assert list(tiny("--out", tmp_path / "run", "--stages", "complete,evaluate")) == ["recipe", "quantize", "train",
                                                                                      "complete", "evaluate"]


def test_the_shapes_recipe_completes_a_test_image_of_every_class():
    argv = pipeline.stage_args("shapes", "complete", "out/s", "", False, "cpu")
    num_prime = int(argv[argv.index("--num_prime") + 1])
    _, labels, classes = make_shapes(num_prime, 4, seed=1)  # the first test images, as quantize.py draws them
    assert sorted(set(labels)) == list(range(len(classes)))


def test_the_shapes_recipe_reports_the_pixel_baseline():
    assert "--baseline" in pipeline.stage_args("shapes", "probe", "out/s", "", False, "cpu")


def test_the_cifar10_recipe_points_every_stage_at_the_same_run():
    argv = {s: pipeline.stage_args("cifar10", s, "out/c", "d.zip", False, "auto") for s in pipeline.STAGES}
    assert argv["quantize"][:3] == ["d.zip:train", "--test", "d.zip:test"]
    assert argv["train"][argv["train"].index("--data") + 1] == "out/c/data/cifar10"
    for stage in ("evaluate", "sample", "complete", "probe", "finetune"):
        assert argv[stage][argv[stage].index("--ckpt") + 1] == "out/c/train/ckpt.pt"
    assert "out/c/data/cifar10_teX.npy" in argv["complete"]
