"""quantize.py, the command line: every file it writes, its refusals, the CIFAR download."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import data
import quantize
from data import holdout, load_tokens, make_shapes
from igpt import save_checkpoint
from palette import decode, encode, find_palette, fit_palette, load_palette
from tiny import tiny_model


CLI = ["shapes", "--test", "shapes", "--num_images", "50", "--n_px", "8", "--k", "16", "--device", "cpu",
       "--workers", "1"]


def test_cli_on_shapes_writes_every_file(tmp_path, capsys):
    out = str(tmp_path / "s")
    quantize.main(CLI + ["--out", out])
    trX, trY = load_tokens(out, "tr")
    vaX, vaY = load_tokens(out, "va")
    teX, teY = load_tokens(out, "te")
    assert trX.dtype == np.uint16 and trX.shape == (45, 64) and vaX.shape == (5, 64) and teX.shape == (10, 64)
    assert trY.dtype == np.int64 and len(trY) == 45 and len(vaY) == 5 and len(teY) == 10
    palette = load_palette(find_palette(out))
    images, labels, _ = make_shapes(50, 8, seed=0)
    tr, va = holdout(50, 0.1, seed=0)
    # the palette is fitted on the training split alone, with the default iterations and seed
    np.testing.assert_array_equal(palette, fit_palette(images[tr], 16, 100, 0, "cpu", progress=False))
    np.testing.assert_array_equal(trX, encode(images[tr], palette, device="cpu"))
    np.testing.assert_array_equal(trY, labels[tr])
    np.testing.assert_array_equal(vaY, labels[va])
    np.testing.assert_array_equal(teX, encode(make_shapes(10, 8, seed=1)[0], palette, device="cpu"))
    np.testing.assert_array_equal(teY, make_shapes(10, 8, seed=1)[1])
    preview = np.asarray(Image.open(out + "_preview.png"))
    assert preview.shape == (2 + 4 * 66, 2 + 16 * 66, 3)  # 32 pairs in 4 rows, tiles 8 x 8 pixels drawn 8 times
    original, quantized = preview[2:66:8, 2:66:8], preview[2:66:8, 68:132:8]  # the first pair, one pixel each
    np.testing.assert_array_equal(quantized, decode(encode(original[None], palette, device="cpu"), palette)[0])
    printed = capsys.readouterr().out
    assert "tr 45, va 5, te 10" in printed and "circle" in printed


def test_cli_refuses_to_overwrite_without_force(tmp_path):
    out = str(tmp_path / "s")
    np.save(out + "_teY.npy", np.zeros(3))
    with pytest.raises(SystemExit, match=r"s_teY\.npy.*--force"):
        quantize.main(CLI + ["--out", out])
    assert not os.path.exists(out + "_trX.npy")  # checked before writing anything
    quantize.main(CLI + ["--out", out, "--force", "--palette", str(write_palette(tmp_path))])
    assert load_tokens(out, "te")[1].shape == (10,)
    np.testing.assert_array_equal(load_palette(out + "_palette.npy"), load_palette(str(tmp_path / "p.npy")))


def test_the_manifest_lists_every_file_and_a_run_cut_short_leaves_a_set_readers_refuse(tmp_path, monkeypatch):
    out = str(tmp_path / "s")
    quantize.main(CLI + ["--out", out])
    listed = json.load(open(out + "_manifest.json"))["files"]
    assert sorted(listed) == sorted(p.name for p in tmp_path.iterdir() if p.name != "s_manifest.json")
    saved, real_save = [], quantize.save_npy

    def save_then_die(path, array):  # the --force run is interrupted after its second file
        real_save(path, array)
        saved.append(path)
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "save_npy", save_then_die)
    with pytest.raises(SystemExit):
        quantize.main(CLI + ["--out", out, "--force", "--k", "4"])
    for split in ("tr", "va", "te"):
        with pytest.raises(ValueError, match="did not finish"):
            load_tokens(out, split)
    monkeypatch.setattr(quantize, "save_npy", real_save)
    quantize.main(CLI + ["--out", out, "--force", "--k", "4"])
    assert load_palette(out + "_palette.npy").shape == (4, 3) and load_tokens(out, "tr")[0].max() < 4


def write_palette(tmp_path):
    np.save(tmp_path / "p.npy", np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32))
    return tmp_path / "p.npy"


def test_cli_needs_labels_unless_told(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((10, 4, 4, 3), np.uint8))
    args = [str(tmp_path / "x.npy"), "--n_px", "4", "--k", "2", "--device", "cpu", "--out", str(tmp_path / "u")]
    with pytest.raises(SystemExit, match="--unlabelled"):
        quantize.main(args)
    quantize.main(args + ["--unlabelled"])
    X, Y = load_tokens(str(tmp_path / "u"), "tr")
    assert Y is None and X.shape == (9, 16) and not os.path.exists(tmp_path / "u_trY.npy")


def test_cli_names_a_missing_source_without_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match=r"no such file or folder: '.*nowhere\.zip'"):
        quantize.main([str(tmp_path / "nowhere.zip"), "--out", str(tmp_path / "q")])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags, message", [
    (["--k", "0"], "--k 0: a palette holds 1 to 65536 colours"),
    (["--k", "70000"], "--k 70000: a palette holds 1 to 65536 colours"),
    (["--n_px", "0"], "--n_px 0: it must be at least 1"),
])
def test_cli_refuses_sizes_no_palette_or_image_can_have_before_reading_anything(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as refused:
        quantize.main(["shapes", "--num_images", "20", "--out", str(tmp_path / "d"), *flags])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "d_trX.npy")


def test_cli_downloads_cifar(tmp_path, cifar_server, monkeypatch):
    url, md5 = cifar_server
    monkeypatch.setitem(data.CIFAR, "cifar10", (url, md5, "cifar-10-batches-py"))
    out = str(tmp_path / "c")
    quantize.main(["cifar10:train", "--test", "cifar10:test", "--download", str(tmp_path / "dl"), "--k", "8",
                   "--device", "cpu", "--val_frac", "0.2", "--out", out])
    assert load_tokens(out, "tr")[0].shape == (8, 1024) and load_tokens(out, "te")[1].tolist() == [9, 0, 1]


def test_the_palette_can_be_a_checkpoints_own(tmp_path):
    palette = np.random.default_rng(3).uniform(-1, 1, (16, 3)).astype(np.float32)
    save_checkpoint(tmp_path / "m.pt", tiny_model(n_px=8), palette=palette)
    quantize.main(CLI + ["--out", str(tmp_path / "s"), "--palette", str(tmp_path / "m.pt")])
    np.testing.assert_array_equal(load_palette(str(tmp_path / "s_palette.npy")), palette)
    save_checkpoint(tmp_path / "bare.pt", tiny_model(n_px=8))
    with pytest.raises(SystemExit, match=r"bare\.pt.* holds no palette: give a checkpoint that has one, or a "
                                         r"palette \.npy"):
        quantize.main(CLI + ["--out", str(tmp_path / "t"), "--palette", str(tmp_path / "bare.pt")])
