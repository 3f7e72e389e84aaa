"""palette.py: k-means, encode, decode, and reading and finding palette files."""
import functools

import numpy as np
import pytest

from igpt import save_checkpoint
from palette import decode, encode, find_palette, fit_palette, load_palette, palette_mse
from tiny import palette as random_palette, tiny_model


def unit(rgb):
    return np.asarray(rgb, np.float32) / 127.5 - 1


def clusters(seed=0, spread=3, per=500):
    """Pixels around four well-separated colours, and the exact mean of each group (in [-1, 1])."""
    rng = np.random.default_rng(seed)
    truth = np.array([[30, 30, 30], [220, 40, 40], [40, 220, 60], [60, 60, 230]])
    groups = [np.clip(c + rng.integers(-spread, spread + 1, (per, 3)), 0, 255) for c in truth]
    pixels = np.concatenate(groups).astype(np.uint8)
    return pixels, np.stack([g.mean(0) / 127.5 - 1 for g in groups])


def sort_rows(a):
    return a[np.lexsort(a.T[::-1])]


def test_decode_is_rint_of_127_5_times_c_plus_1():
    palette = np.array([[-1, 1, 0], [-0.5, 0.5, 0.25], [1, -1, -0.25]], np.float32)
    images = decode(np.array([[0, 1, 2, 0]]), palette)
    # 127.5 * (c + 1): 0, 255, 127.5 -> 128 (half to even), 63.75 -> 64, 191.25 -> 191, 159.375, 95.625
    expected = np.array([[0, 255, 128], [64, 191, 159], [255, 0, 96], [0, 255, 128]], np.uint8)
    assert images.dtype == np.uint8 and images.shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(images.reshape(4, 3), expected)


def test_images_of_palette_colours_encode_to_their_indices_and_decode_back_exactly():
    rng = np.random.default_rng(0)
    colours = np.unique(rng.integers(0, 256, (80, 3)), axis=0)[:64].astype(np.uint8)
    index = rng.integers(0, 64, (5, 6, 6))
    images = colours[index]
    tokens = encode(images, unit(colours), device="cpu")
    assert tokens.dtype == np.uint16 and tokens.shape == (5, 36)
    np.testing.assert_array_equal(tokens, index.reshape(5, 36))  # raster order
    np.testing.assert_array_equal(decode(tokens, unit(colours)), images)


def test_encode_of_no_images_is_no_token_rows_of_the_images_length():
    # an empty split, as quantize.py --val_frac 0 makes: zero rows of H*W tokens, not an error
    tokens = encode(np.zeros((0, 8, 6, 3), np.uint8), np.zeros((4, 3), np.float32), device="cpu")
    assert tokens.shape == (0, 48) and tokens.dtype == np.uint16


def test_encode_picks_the_nearest_centre_like_a_float64_brute_force():
    rng = np.random.default_rng(1)
    palette = rng.uniform(-1, 1, (37, 3)).astype(np.float32)
    images = rng.integers(0, 256, (4, 9, 9, 3), dtype=np.uint8)
    d = ((unit(images).reshape(-1, 1, 3).astype(np.float64) - palette.astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(encode(images, palette, device="cpu").reshape(-1), d.argmin(1))
    assert palette_mse(images, palette, device="cpu") == pytest.approx(d.min(1).mean(), rel=1e-5)


def test_fit_recovers_well_separated_clusters_as_their_means():
    pixels, means = clusters()
    palette = fit_palette(pixels, k=4, seed=0, device="cpu", progress=False)
    assert palette.dtype == np.float32 and palette.shape == (4, 3)
    np.testing.assert_allclose(sort_rows(palette), sort_rows(means), atol=1e-6)


def test_fit_is_deterministic_for_a_seed():
    images = np.random.default_rng(2).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    fit = functools.partial(fit_palette, images, k=16, iters=5, device="cpu", progress=False)
    np.testing.assert_array_equal(fit(seed=3), fit(seed=3))
    assert not np.array_equal(fit(seed=3), fit(seed=4))


def test_more_centres_than_colours_gives_distinct_finite_centres_holding_every_colour():
    colours = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 128, 255], [17, 200, 3]], np.uint8)
    images = colours[np.random.default_rng(0).integers(0, 5, (3, 4, 4))]
    palette = fit_palette(images, k=8, device="cpu", progress=False)
    assert np.isfinite(palette).all() and len(np.unique(palette, axis=0)) == 8
    np.testing.assert_array_equal(decode(encode(images, palette, device="cpu"), palette), images)


def test_empty_clusters_of_a_degenerate_init_are_reseeded():
    pixels, means = clusters()
    palette = fit_palette(pixels, k=4, device="cpu", progress=False, init=np.zeros((4, 3)))  # all one centre
    assert np.isfinite(palette).all()
    np.testing.assert_allclose(sort_rows(palette), sort_rows(means), atol=1e-6)


def test_fit_refuses_what_is_not_uint8_rgb():
    with pytest.raises(ValueError, match="uint8 RGB"):
        fit_palette(np.zeros((10, 3), np.float32), k=2, device="cpu", progress=False)


def test_load_palette_and_find_palette(tmp_path):
    palette = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float64)
    np.save(tmp_path / "kmeans_centers.npy", palette)
    loaded = load_palette(str(tmp_path / "kmeans_centers.npy"))
    assert loaded.dtype == np.float32 and np.array_equal(loaded, palette.astype(np.float32))
    prefix = str(tmp_path / "cifar10")
    assert find_palette(prefix) == str(tmp_path / "kmeans_centers.npy")
    np.save(prefix + "_palette.npy", palette)
    assert find_palette(prefix) == prefix + "_palette.npy"
    assert find_palette(str(tmp_path / "sub" / "x")) is None
    np.save(tmp_path / "rgb.npy", np.zeros((16, 4), np.float32))
    with pytest.raises(ValueError, match=r"float \[k, 3\]"):
        load_palette(str(tmp_path / "rgb.npy"))
    np.save(tmp_path / "bytes.npy", np.full((16, 3), 200.0))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        load_palette(str(tmp_path / "bytes.npy"))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_palette(str(tmp_path / "missing.npy"))


def test_a_checkpoint_gives_the_palette_it_holds(tmp_path):
    save_checkpoint(tmp_path / "m.pt", tiny_model(), palette=random_palette())
    loaded = load_palette(str(tmp_path / "m.pt"))
    assert loaded.dtype == np.float32 and np.array_equal(loaded, random_palette())


def test_a_checkpoint_without_a_palette_is_refused_naming_it(tmp_path):
    save_checkpoint(tmp_path / "m.pt", tiny_model())
    with pytest.raises(ValueError, match=r"m\.pt' holds no palette: give a checkpoint that has one, or a palette "
                                         r"\.npy"):
        load_palette(str(tmp_path / "m.pt"))


def test_an_archive_of_arrays_is_refused_as_a_palette_naming_the_file(tmp_path):
    np.savez(tmp_path / "p.npz", palette=random_palette())
    with pytest.raises(ValueError, match=r"p\.npz is not a plain numeric \.npy \(it is a zip archive .*\): give a "
                                         r"palette \.npy \[k, 3\] .* or a checkpoint \.pt"):
        load_palette(str(tmp_path / "p.npz"))


def test_more_colours_asked_for_than_the_images_hold_is_said(capsys):
    pixels = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]] * 10, np.uint8)
    fit_palette(pixels, k=8, iters=5, device="cpu", progress=False)
    note = "only 3 distinct colours, so 5 of the 8 palette colours stay unused; k=3 (quantize.py --k 3) would lose"
    assert note in capsys.readouterr().err
