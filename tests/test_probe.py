"""Linear probes: features against a hand computation, the fit against scikit-learn, the cache, the choice of C,
and the command line end to end."""
import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.linear_model import LogisticRegression

import probe
from igpt import IGPT, fixed_mask, save_checkpoint
from probe import (NotConverged, accuracy, cache_dir, extract_features, fit_logistic, layer_spec, main,
                   parse_layers, pixel_features, plot, probe_layer, probe_layers, standardise)
from tiny import tiny_model, tokens


def blobs(n, d, k, seed, spread=0.4):
    """n points of k Gaussian classes in d dimensions, class means drawn with the given spread."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=torch.Generator().manual_seed(0)) * spread
    y = torch.randint(k, (n,), generator=g)
    return means[y] + torch.randn(n, d, generator=g), y


def write_data(prefix, sizes=(40, 20, 20), n_px=4, n_vocab=16, classes=3):
    """Token files {prefix}_{tr,va,te}{X,Y}.npy as quantize.py writes them; the class shifts the tokens."""
    rng = np.random.default_rng(0)
    for split, n in zip(("tr", "va", "te"), sizes):
        y = rng.integers(0, classes, n)
        x = (rng.integers(0, n_vocab // 2, (n, n_px * n_px)) + y[:, None] * 3) % n_vocab
        np.save(f"{prefix}_{split}X.npy", x.astype(np.uint16))
        np.save(f"{prefix}_{split}Y.npy", y.astype(np.int64))


@pytest.fixture
def run(tmp_path):
    """A tiny checkpoint and data set; run(*args) calls the command line on them."""
    save_checkpoint(tmp_path / "m.pt", tiny_model())
    write_data(tmp_path / "d")

    def run(*args):
        main(["--ckpt", str(tmp_path / "m.pt"), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "out"),
              "--device", "cpu", "--Cs", "0.1,1", *args])
    return run


@pytest.mark.parametrize("layers, spec", [([8, 9, 10, 11, 12], "8-12"), ([6, 9, 12], "6,9,12"), ([1, 2, 3, 7], "1-3,7"),
                                          ([4], "4")])
def test_layer_spec_is_the_shortest_spec_that_reads_back_as_the_layers(layers, spec):
    assert layer_spec(layers) == spec and parse_layers(spec, 12) == layers


# ---- features ----

def test_features_equal_a_hand_computation_whatever_the_batch_size():
    model, x = tiny_model(), tokens(batch=7)
    h = torch.cat([model.sos.expand(7, 1, -1), model.wte.weight[x[:, :-1]]], 1) + model.wpe.weight[:16]
    by_hand = []
    for block in model.h:
        h = block(h)
        by_hand.append((h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).mean(1))
    for batch_size in (7, 3, 1):
        f = extract_features(model, x.numpy().astype(np.uint16), [2, 1], batch_size=batch_size, device="cpu")
        assert f.dtype == torch.float32 and f.shape == (7, 2, 32)
        torch.testing.assert_close(f[:, 0], by_hand[1])
        torch.testing.assert_close(f[:, 1], by_hand[0])


def test_a_bert_models_features_read_each_image_under_its_fixed_mask_whatever_the_batch(monkeypatch):
    model, x = tiny_model(bert=True), tokens(batch=7)
    expected = model.features(x, [2, 1], mask=fixed_mask(range(7), model.config, seed=(2, 1)))
    for batch_size in (7, 3):
        f = extract_features(model, x.numpy(), [2, 1], batch_size=batch_size, device="cpu", mask_seed=(2, 1))
        torch.testing.assert_close(f, expected)
    monkeypatch.setattr(torch, "compile", lambda fn: fn)  # the compiled pass pads the last batch, and its mask
    f = extract_features(model, x.numpy(), [2, 1], batch_size=4, device="cpu", compile=True, mask_seed=(2, 1))
    torch.testing.assert_close(f, expected)
    other = extract_features(model, x.numpy(), [2, 1], device="cpu", mask_seed=(2, 2))
    assert not torch.allclose(other, expected)


def test_features_reject_images_of_another_size_and_tokens_outside_the_palette():
    model = tiny_model()
    with pytest.raises(ValueError, match="n_px=4"):
        extract_features(model, np.zeros((2, 25), np.int64), [1], device="cpu")
    with pytest.raises(ValueError, match="0..15"):
        extract_features(model, np.full((2, 16), 16), [1], device="cpu")


def test_parse_layers():
    assert parse_layers("all", 4) == [1, 2, 3, 4]
    assert parse_layers("3", 4) == [3]
    assert parse_layers("4,1,2", 4) == [1, 2, 4]
    assert parse_layers("2-4", 24) == [2, 3, 4]
    for bad in ("0", "5", "1,5", "2-9", "x", ""):
        with pytest.raises(ValueError):
            parse_layers(bad, 4)


# ---- logistic regression ----

@pytest.mark.parametrize("C", [0.01, 1.0])
@pytest.mark.filterwarnings("ignore::probe.NotConverged")  # tol 1e-6 can lie below float32's reach
def test_fit_matches_scikit_learn(C):
    X, y = blobs(600, 20, 4, seed=1)
    X_test, y_test = blobs(600, 20, 4, seed=2)
    W, b = fit_logistic(X, y, C, tol=1e-6, device="cpu")
    ours = torch.softmax(X_test @ W + b, 1).numpy()
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(X.double().numpy(), y.numpy())
    theirs = ref.predict_proba(X_test.double().numpy())
    assert np.abs(ours - theirs).max() < 1e-3
    assert abs((ours.argmax(1) == y_test.numpy()).mean() - ref.score(X_test.numpy(), y_test.numpy())) <= 0.005
    assert 0.5 < ref.score(X_test.numpy(), y_test.numpy()) < 0.95  # a case where C matters
    torch.testing.assert_close(b.sum(), torch.tensor(0.0), atol=1e-5, rtol=0)


def test_fit_has_a_class_for_each_it_is_told_of_even_those_missing_from_the_labels():
    X, y = blobs(30, 4, 3, seed=1)
    W, b = fit_logistic(X, y, 1.0, device="cpu", n_classes=5)
    assert W.shape == (4, 5) and b.shape == (5,)


def test_a_class_only_val_holds_is_learnt_by_the_refit_on_train_and_val():
    # classes far apart along their own axes; class 2 is missing from train, so only the refit on train + val sees it
    g = torch.Generator().manual_seed(0)
    points = lambda y: (torch.eye(3)[y] * 10 + torch.randn(len(y), 3, generator=g), y)
    train, val, test = points(torch.arange(30) % 2), points(torch.arange(30) % 3), points(torch.arange(30) % 3)
    result = probe_layer(train, val, test, [0.1, 1.0], device="cpu")
    assert result["val_acc"] == pytest.approx(2 / 3) and result["test_acc"] == 1.0


def test_standardise_uses_the_training_statistics():
    tr, other = torch.randn(100, 5) * 3 + 2, torch.randn(10, 5)
    s_tr, s_other = standardise(tr, other)
    torch.testing.assert_close(s_tr.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(s_tr.std(0), torch.ones(5))
    torch.testing.assert_close(s_other, (other - tr.mean(0)) / tr.std(0))


@pytest.mark.filterwarnings("ignore::probe.NotConverged")  # tol 1e-6 can lie below float32's reach
def test_the_C_best_on_validation_is_chosen():
    # Classes 0 and 1 along the first feature, class 0 four times as common in training; class 2 far off along the
    # second. As C shrinks the unpenalised bias wins and the 0|1 boundary moves right. Validation points of
    # class 1 lie right of the boundary of the middle C and points of class 0 left of it, each between it and
    # a neighbour's boundary, so only the middle C gets them all right. The boundaries come from scikit-learn.
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 80 + [1] * 20 + [2] * 20)
    X = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 8.0]])[y] + torch.randn(120, 2, generator=g)
    Cs = [0.01, 0.1, 10.0]
    S, = standardise(X)
    mean, std = X.mean(0).double(), X.std(0).double()
    refs = [LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(S.double().numpy(), y.numpy()) for C in Cs]
    cuts = []
    for ref in refs:  # where classes 0 and 1 are equally likely on the line x2 = 0, unstandardised
        W, b = ref.coef_, ref.intercept_
        s2 = -mean[1] / std[1]
        cuts.append(float((b[0] - b[1] + (W[0, 1] - W[1, 1]) * s2) / (W[1, 0] - W[0, 0]) * std[0] + mean[0]))
    assert cuts[0] - cuts[1] > 0.3 and cuts[1] - cuts[2] > 0.3
    X_val = torch.tensor([[(cuts[0] + cuts[1]) / 2, 0.0]] * 5 + [[(cuts[1] + cuts[2]) / 2, 0.0]] * 5)
    y_val = torch.tensor([1] * 5 + [0] * 5)
    _, S_val = standardise(X, X_val)
    assert [ref.score(S_val.numpy(), y_val.numpy()) for ref in refs] == [0.5, 1.0, 0.5]
    result = probe_layer((X, y), (X_val, y_val), (X, y), Cs, device="cpu", tol=1e-6)
    assert result["val_accs"] == [0.5, 1.0, 0.5]
    assert result["C"] == 0.1 and result["val_acc"] == 1.0
    assert 0.8 < result["test_acc"] <= 1.0


def test_accuracy_over_masks_counts_the_modal_prediction_and_breaks_ties_at_random():
    W, b = torch.eye(3), torch.zeros(3)
    views = {"0": [0, 0, 1, 2], "1": [2, 1, 1, 0], "tie": [0, 0, 1, 1]}  # each view's predicted class
    X = torch.cat([predicted_as(views[kind]).repeat(1, n, 1) for kind, n in (("0", 10), ("1", 10), ("tie", 400))], 1)
    y_tie_first = torch.tensor([0] * 10 + [1] * 10 + [0] * 400)
    assert 0.4 < accuracy(W, b, X, y_tie_first) < 0.6  # 20 right, and about half of the 400 ties go to 0
    assert accuracy(W, b, X, torch.tensor([0] * 10 + [1] * 10 + [2] * 400)) == pytest.approx(20 / 420)  # never 2
    assert accuracy(W, b, X, y_tie_first) == accuracy(W, b, X, y_tie_first)  # the same draw on every call
    assert accuracy(W, b, X[0], y_tie_first) == pytest.approx(410 / 420)  # one view: no vote


def predicted_as(classes):
    """[K, 1, 3] features of one image whose view k is predicted as classes[k] by the identity probe."""
    return torch.eye(3)[classes][:, None]


# ---- the baseline on the raw pixels ----

def test_pixel_features_are_each_tokens_palette_colour_in_raster_order():
    palette = np.array([[-1, -1, -1], [0, 0.5, 1], [1, -0.5, 0]], np.float32)
    f = pixel_features(np.array([[0, 2], [1, 1]], np.uint16), palette)
    assert f.dtype == torch.float32
    torch.testing.assert_close(f, torch.tensor([[-1, -1, -1, 1, -0.5, 0], [0, 0.5, 1, 0, 0.5, 1]]))


def test_the_pixel_baseline_is_the_probe_scikit_learn_fits_on_the_palette_colours(tmp_path):
    write_data(tmp_path / "d", sizes=(90, 45, 45))
    palette = (np.random.default_rng(1).random((16, 3)) * 2 - 1).astype(np.float32)
    save_checkpoint(tmp_path / "m.pt", tiny_model(), palette=palette)
    Cs = [0.001, 0.01, 1.0]
    report = probe_layers(str(tmp_path / "m.pt"), str(tmp_path / "d"), "1", Cs, str(tmp_path / "out"),
                          device="cpu", tol=1e-6, baseline=True)
    # by hand: every pixel's colour, standardised on the fitting set (ddof 1, as torch's std), one fit per C,
    # the C best on va refitted on tr + va and scored on te
    X = {s: palette[np.load(tmp_path / f"d_{s}X.npy").astype(np.int64)].reshape(-1, 48).astype(np.float64)
         for s in ("tr", "va", "te")}
    y = {s: np.load(tmp_path / f"d_{s}Y.npy") for s in ("tr", "va", "te")}
    scaled = lambda fit, x: (x - X[fit].mean(0)) / X[fit].std(0, ddof=1)
    fit = lambda C, x, labels: LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(x, labels)
    val_accs = [fit(C, scaled("tr", X["tr"]), y["tr"]).score(scaled("tr", X["va"]), y["va"]) for C in Cs]
    best = Cs[int(np.argmax(val_accs))]
    X["trva"], y["trva"] = np.concatenate([X["tr"], X["va"]]), np.concatenate([y["tr"], y["va"]])
    test_acc = fit(best, scaled("trva", X["trva"]), y["trva"]).score(scaled("trva", X["te"]), y["te"])
    assert len(set(val_accs)) > 1  # a case where C matters
    pixels = report["pixels"]
    assert pixels["val_accs"] == pytest.approx(val_accs, abs=1e-6) and pixels["C"] == best
    assert pixels["test_acc"] == pytest.approx(test_acc, abs=1e-6)
    assert json.loads((tmp_path / "out" / "probe.json").read_text())["pixels"] == pixels



def test_concat_probes_the_named_layers_features_joined_end_to_end(tmp_path):
    save_checkpoint(tmp_path / "m.pt", tiny_model())
    write_data(tmp_path / "d")
    report = probe_layers(str(tmp_path / "m.pt"), str(tmp_path / "d"), "1", [0.1, 1.0], str(tmp_path / "out"),
                          device="cpu", concat="1,2")
    model = IGPT.from_checkpoint(tmp_path / "m.pt")
    sets = []
    for split in ("tr", "va", "te"):  # by hand: layers 1 and 2 of one forward pass, side by side
        X, y = np.load(tmp_path / f"d_{split}X.npy"), np.load(tmp_path / f"d_{split}Y.npy")
        f = model.features(torch.from_numpy(X.astype(np.int64)), [1, 2])  # [N, 2, n_embd]
        sets.append((f.flatten(1), torch.from_numpy(y)))
    assert report["concat"] == {"layers": [1, 2], **probe_layer(*sets, [0.1, 1.0], device="cpu")}
    assert [r["layer"] for r in report["rows"]] == [1]  # the table keeps the layers asked for
    assert json.loads((tmp_path / "out" / "probe.json").read_text())["concat"]["layers"] == [1, 2]


def test_fits_stopped_at_max_iter_make_one_note_and_no_warnings(tmp_path, capsys):
    save_checkpoint(tmp_path / "m.pt", tiny_model())
    write_data(tmp_path / "d")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning left over would fail the call
        probe_layers(str(tmp_path / "m.pt"), str(tmp_path / "d"), "all", [0.1, 1.0], str(tmp_path / "out"),
                     device="cpu", max_iter=1, tol=1e-12)
    notes = [line for line in capsys.readouterr().err.splitlines() if "--max_iter" in line]
    assert len(notes) == 1 and notes[0].startswith("note: 6 of 6 fits stopped with the gradient above --tol 1e-12")
    assert "6 of them at the limit of --max_iter 1," in notes[0]


def test_a_fit_stopped_at_max_iter_warns_with_its_gradient():
    X, y = torch.randn(40, 3, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 2
    with pytest.warns(NotConverged, match="after 1 iterations, at its limit") as record:
        fit_logistic(X, y, 1.0, max_iter=1, tol=1e-12, device="cpu")
    assert record[0].message.grad > 1e-12 and record[0].message.at_limit


def test_a_fit_that_stalls_before_max_iter_with_the_gradient_above_tol_warns_too():
    X = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    y = (X[:, 0] > 0).long()  # separable: the loss flattens out in float32 long before the gradient reaches tol
    with pytest.warns(NotConverged, match="the loss no longer changing") as record:
        W, b = fit_logistic(X, y, 1e4, max_iter=1000, tol=1e-8, device="cpu")
    W, b = W.clone().requires_grad_(), b.clone().requires_grad_()
    (F.cross_entropy(X @ W + b, y) + W.pow(2).sum() / (2e4 * 200)).backward()  # the gradient, recomputed
    grad = max(W.grad.abs().max(), b.grad.abs().max()).item()
    assert not record[0].message.at_limit and grad > 1e-8 and record[0].message.grad == pytest.approx(grad)


def test_the_plot_draws_the_joined_layers_as_a_green_line_only_when_asked(tmp_path):
    save_checkpoint(tmp_path / "m.pt", tiny_model())
    write_data(tmp_path / "d")
    greens = {}
    for concat in (None, "1,2"):
        out = tmp_path / f"out-{concat}"
        probe_layers(str(tmp_path / "m.pt"), str(tmp_path / "d"), "all", [0.1, 1.0], str(out), device="cpu",
                     concat=concat)
        greens[concat] = (0, 128, 0) in {c for _, c in Image.open(out / "probe.png").getcolors(1 << 16)}
    assert greens == {None: False, "1,2": True}


def test_the_plots_key_lies_above_the_plotting_area_where_no_line_can_cross_it(tmp_path):
    rows = [{"layer": l, "val_acc": 0.42, "test_acc": 0.45} for l in (1, 2)]
    plot(rows, tmp_path / "p.png", across=[("joined", {"test_acc": 0.48}, "green")])
    img = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    blue = img[..., 2].astype(int) - img[..., 0] > 100  # the test curve and its key, anti-aliased
    assert blue[:30].any()  # the key's "test", in the title's band above the plot
    assert not blue[30:60, 580:].any()  # and not in the plot's top right corner, which the curve does not reach

# ---- the feature cache ----

def test_cached_features_are_reused_and_only_for_the_same_checkpoint_and_data(tmp_path, monkeypatch):
    calls = []
    features = IGPT.features
    monkeypatch.setattr(IGPT, "features", lambda self, x, layers, mask=None: calls.append(list(layers)) or
                        features(self, x, layers, mask))
    write_data(tmp_path / "d")
    ckpt, other = str(tmp_path / "m.pt"), str(tmp_path / "other.pt")
    save_checkpoint(ckpt, tiny_model(seed=0))
    save_checkpoint(other, tiny_model(seed=1))

    def probe(layers, ckpt=ckpt):
        calls.clear()
        rows = probe_layers(ckpt, str(tmp_path / "d"), layers, [1.0], str(tmp_path / "out"), device="cpu",
                            force=True)
        return rows, sorted({l for c in calls for l in c})

    first, extracted = probe("1")
    assert extracted == [1] and len(calls) == 3  # tr, va, te: one batch each
    again, extracted = probe("1")
    assert extracted == [] and again == first
    _, extracted = probe("1,2")
    assert extracted == [2]  # only the layer not yet cached
    _, extracted = probe("1,2", ckpt=other)
    assert extracted == [1, 2]
    save_checkpoint(ckpt, tiny_model(seed=2))  # the same path, new weights
    os.utime(ckpt, ns=(1, 1))
    _, extracted = probe("1")
    assert extracted == [1]
    assert len(list((tmp_path / "out" / "features").iterdir())) == 3
    folder = cache_dir(ckpt, str(tmp_path / "d"), str(tmp_path / "out"))
    fresh = extract_features(IGPT.from_checkpoint(ckpt), np.load(tmp_path / "d_teX.npy"), [1], device="cpu")
    np.testing.assert_array_equal(np.load(os.path.join(folder, "te_layer001.npy")), fresh[:, 0].numpy())


def test_the_feature_pass_runs_on_device_and_every_fit_on_fit_device(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "m.pt", tiny_model())
    write_data(tmp_path / "d")
    passes, fits = [], []  # the devices asked for; the work itself runs on the CPU, the only device here
    extract, fit = probe.extract_features, probe.probe_layer
    monkeypatch.setattr(probe, "extract_features", lambda model, X, layers, device=None, **kw:
                        passes.append(device) or extract(model, X, layers, device="cpu"))
    monkeypatch.setattr(probe, "probe_layer", lambda train, val, test, Cs, device, *rest:
                        fits.append(device) or fit(train, val, test, Cs, "cpu", *rest))
    probe_layers(str(tmp_path / "m.pt"), str(tmp_path / "d"), Cs=[1.0], out=str(tmp_path / "out"), device="cuda:1",
                 concat="1-2", fit_device="cpu")
    assert passes == ["cuda:1"] * 3 and fits == ["cpu"] * 3  # a pass per split; a fit per layer, one joined


# ---- the command line ----

def test_cli_writes_the_table_and_the_plot(run, tmp_path, capsys):
    run("--layers", "all")
    out = capsys.readouterr().out
    assert "layer" in out and "test acc" in out
    table = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert [r["layer"] for r in table["rows"]] == [1, 2] and table["Cs"] == [0.1, 1.0]
    model = IGPT.from_checkpoint(tmp_path / "m.pt")
    for r in table["rows"]:  # by hand: that layer's features of each split, one probe_layer
        sets = [(model.features(torch.from_numpy(np.load(tmp_path / f"d_{s}X.npy").astype(np.int64)), [r["layer"]])
                 [:, 0], torch.from_numpy(np.load(tmp_path / f"d_{s}Y.npy"))) for s in ("tr", "va", "te")]
        assert r == {"layer": r["layer"], **probe_layer(*sets, [0.1, 1.0], device="cpu")}
    img = Image.open(tmp_path / "out" / "probe.png")
    colors = {c for _, c in img.getcolors(1 << 16)}
    assert img.size == (640, 400) and {(0, 0, 255), (128, 128, 128), (0, 0, 0)} <= colors  # test, val, axes


def test_cli_probes_a_bert_model_under_fixed_masks_and_votes_over_them(tmp_path):
    save_checkpoint(tmp_path / "bert.pt", tiny_model(bert=True))
    write_data(tmp_path / "d")
    main(["--ckpt", str(tmp_path / "bert.pt"), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "out"),
          "--device", "cpu", "--Cs", "0.1,1", "--layers", "2", "--bert_masks", "3"])
    report = json.loads((tmp_path / "out" / "probe.json").read_text())
    model = IGPT.from_checkpoint(tmp_path / "bert.pt")
    sets = []
    for s, split in enumerate(("tr", "va", "te")):  # by hand: one mask a training image, three for va and te
        X, y = np.load(tmp_path / f"d_{split}X.npy"), np.load(tmp_path / f"d_{split}Y.npy")
        views = [model.features(torch.from_numpy(X.astype(np.int64)), [2],
                                mask=fixed_mask(range(len(X)), model.config, seed=(s, k)))[:, 0]
                 for k in range(1 if split == "tr" else 3)]
        sets.append((views[0] if split == "tr" else torch.stack(views), torch.from_numpy(y)))
    expected = probe_layer(*sets, [0.1, 1.0], device="cpu")
    assert report["bert_masks"] == 3 and report["rows"] == [{"layer": 2, **expected}]
    cached = sorted(p.name for p in next((tmp_path / "out" / "features").iterdir()).glob("*.npy"))
    assert cached == ["te_layer002_mask0.npy", "te_layer002_mask1.npy", "te_layer002_mask2.npy",
                      "tr_layer002_mask0.npy",
                      "va_layer002_mask0.npy", "va_layer002_mask1.npy", "va_layer002_mask2.npy"]


def test_cli_refuses_several_masks_for_an_autoregressive_model(run):
    with pytest.raises(SystemExit, match="above 1 only for a BERT model"):
        run("--bert_masks", "2")


def test_cli_baseline_needs_the_palette_beside_the_data(run):
    with pytest.raises(SystemExit, match="d_palette.npy is missing"):  # none in the tiny checkpoint or beside the data
        run("--baseline")


def test_cli_baseline_is_the_same_probe_on_each_pixels_colour_drawn_as_a_dashed_line(run, tmp_path, capsys):
    np.save(tmp_path / "d_palette.npy", np.linspace(-1, 1, 48, dtype=np.float32).reshape(16, 3))
    run("--baseline")
    assert "pixels" in capsys.readouterr().out
    table = json.loads((tmp_path / "out" / "probe.json").read_text())
    palette = np.load(tmp_path / "d_palette.npy")
    sets = [(pixel_features(np.load(tmp_path / f"d_{s}X.npy"), palette), torch.from_numpy(np.load(tmp_path /
             f"d_{s}Y.npy"))) for s in ("tr", "va", "te")]
    assert table["pixels"] == probe_layer(*sets, [0.1, 1.0], device="cpu")
    orange = (np.asarray(Image.open(tmp_path / "out" / "probe.png").convert("RGB")) == (255, 165, 0)).all(-1)
    row = orange[orange.sum(1).argmax()]  # the line's row: dashes of orange with gaps between
    runs = np.flatnonzero(np.diff(row.astype(int)) == 1)
    assert len(runs) > 10


def test_cli_without_baseline_reports_no_pixels_probe(run, tmp_path):
    np.save(tmp_path / "d_palette.npy", np.linspace(-1, 1, 48, dtype=np.float32).reshape(16, 3))
    run("--baseline")
    run("--force")
    assert json.loads((tmp_path / "out" / "probe.json").read_text())["pixels"] is None


@pytest.mark.parametrize("args, message", [
    (["--layers", "3"], "1..2"),
    (["--layer", "0"], "1..2"),
    (["--layers", "one"], "cannot read layers"),
    (["--Cs", "0,1"], "positive"),
])
def test_cli_rejects_bad_layers_and_Cs(run, args, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        run(*args)


def test_cli_errors_name_the_missing_file(run, tmp_path):
    os.remove(tmp_path / "d_vaX.npy")
    with pytest.raises(SystemExit, match=r"d_vaX\.npy"):
        run()
    os.remove(tmp_path / "m.pt")
    with pytest.raises(SystemExit, match=r"m\.pt"):
        run()


def test_cli_rejects_data_of_another_n_px_or_palette(run, tmp_path):
    write_data(tmp_path / "d", n_px=5)
    with pytest.raises(SystemExit, match="n_px=4"):
        run()
    write_data(tmp_path / "d", n_vocab=32)
    with pytest.raises(SystemExit, match="palette"):
        run()


@pytest.mark.parametrize("bad, message", [(np.full((20, 16), 16), r"token values span 16\.\.16"),
                                          (np.zeros((20, 25)), r"token images of shape \[20, 25\]")])
def test_a_split_the_model_cannot_read_is_refused_naming_its_file_before_any_features_are_extracted(tmp_path, bad,
                                                                                                    message):
    save_checkpoint(tmp_path / "m.pt", tiny_model())
    write_data(tmp_path / "d")
    np.save(tmp_path / "d_teX.npy", bad.astype(np.uint16))  # the last split read
    with pytest.raises(ValueError, match=r"d_teX\.npy: " + message):
        probe_layers(str(tmp_path / "m.pt"), str(tmp_path / "d"), "1", [1.0], str(tmp_path / "out"), device="cpu")
    assert not (tmp_path / "out" / "features").exists()


def test_a_damaged_cached_feature_file_is_named_with_the_way_out(tmp_path):
    save_checkpoint(tmp_path / "m.pt", tiny_model())
    write_data(tmp_path / "d")
    probe = lambda: probe_layers(str(tmp_path / "m.pt"), str(tmp_path / "d"), "1", [1.0], str(tmp_path / "out"),
                                 device="cpu", force=True)
    probe()
    cached = next((tmp_path / "out" / "features").glob("*/va_layer001.npy"))
    cached.write_bytes(cached.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"va_layer001\.npy is not a plain numeric \.npy \(it is cut short .*: "
                                         "delete it, and the features are extracted again"):
        probe()
    cached.unlink()
    probe()


def test_cli_needs_labels(run, tmp_path):
    os.remove(tmp_path / "d_teY.npy")
    with pytest.raises(SystemExit, match=r"d_teY\.npy"):
        run()


def test_cli_reads_one_hot_labels_as_in_the_original_release(run, tmp_path):
    run("--out", str(tmp_path / "a"))
    for split in ("tr", "va", "te"):
        y = np.load(tmp_path / f"d_{split}Y.npy")
        np.save(tmp_path / f"d_{split}Y.npy", np.eye(3, dtype=np.float32)[y])
    run("--out", str(tmp_path / "b"))
    rows = [json.loads((tmp_path / out / "probe.json").read_text())["rows"] for out in "ab"]
    assert rows[0] == rows[1]


def test_cli_does_not_overwrite_an_earlier_report_without_force(run, tmp_path):
    run()
    before = (tmp_path / "out" / "probe.json").read_bytes()
    with pytest.raises(SystemExit, match=r"probe\.json exists: pass --force"):
        run("--Cs", "1")
    assert (tmp_path / "out" / "probe.json").read_bytes() == before
    run("--Cs", "1", "--force")
    assert json.loads((tmp_path / "out" / "probe.json").read_text())["Cs"] == [1.0]


def test_cli_refuses_data_of_another_palette_than_the_models(run, tmp_path):
    np.save(tmp_path / "d_palette.npy", np.zeros((8, 3), np.float32))
    with pytest.raises(SystemExit, match=r"d_palette\.npy has 8 colours but the model has 16 tokens"):
        run()
    np.save(tmp_path / "d_palette.npy", np.zeros((16, 3), np.float32))
    save_checkpoint(tmp_path / "m.pt", tiny_model(), palette=np.ones((16, 3), np.float32) / 2)
    with pytest.raises(SystemExit, match=r"palettes of .*d_palette\.npy .* and .*m\.pt .* differ"):
        run()
