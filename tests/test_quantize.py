"""quantize.py: the palette (k-means, encode, decode), image modes, every dataset reader, token files, the CLI."""
import functools
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

import quantize
from quantize import (decode, download_cifar, encode, find_palette, fit_palette, holdout, load_images,
                      load_palette, load_tokens, make_shapes, palette_mse, save_grid, to_rgb)


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


def png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


def solid(colour, size=8):
    return np.full((size, size, 3), colour, np.uint8)


# ---- palette ----

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


# ---- image modes ----

def test_greyscale_and_16_bit_become_grey_rgb():
    assert (to_rgb(Image.new("L", (5, 5), 77), 4) == 77).all()
    values = np.array([[0, 257 * 3], [257 * 200, 65535]], np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    rgb = to_rgb(image, 2)
    np.testing.assert_array_equal(rgb[..., 0], [[0, 3], [200, 255]])
    assert (rgb == rgb[..., :1]).all()


def test_transparency_is_composited_onto_white():
    rgba = np.array([[[100, 0, 200, 0], [100, 0, 200, 255]], [[100, 0, 200, 51], [10, 20, 30, 255]]], np.uint8)
    rgb = to_rgb(Image.fromarray(rgba, "RGBA"), 2)
    # a = 51/255 = 0.2: 0.2*c + 0.8*255
    np.testing.assert_array_equal(rgb, [[[255, 255, 255], [100, 0, 200]], [[224, 204, 244], [10, 20, 30]]])
    la = to_rgb(Image.fromarray(np.array([[[50, 0], [50, 255]]], np.uint8), "LA"), 1).reshape(3)
    np.testing.assert_array_equal(la, [255, 255, 255])  # the crop keeps the left, transparent pixel

    p = Image.new("P", (2, 2), 0)
    p.putpalette([9, 9, 9, 40, 50, 60] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0
    np.testing.assert_array_equal(to_rgb(p, 2), [[[255] * 3, [255] * 3], [[255] * 3, [40, 50, 60]]])


def test_non_square_images_are_centre_cropped_then_box_averaged():
    wide = np.zeros((4, 6, 3), np.uint8)
    wide[:] = (np.arange(6) * 10)[None, :, None]
    np.testing.assert_array_equal(to_rgb(Image.fromarray(wide), 4)[0, :, 0], [10, 20, 30, 40])
    tall = wide.transpose(1, 0, 2)
    np.testing.assert_array_equal(to_rgb(Image.fromarray(np.ascontiguousarray(tall)), 4)[:, 0, 0], [10, 20, 30, 40])
    big = np.zeros((8, 8, 3), np.uint8)
    big[:2, :2] = np.array([[10, 20], [30, 40]])[..., None]
    big[2:4, 2:4] = 90
    out = to_rgb(Image.fromarray(big), 4)
    assert out[0, 0, 0] == 25 and out[1, 1, 0] == 90 and out[0, 1, 0] == 0


# ---- readers ----

def class_folder(root, split=""):
    """b/ holds red and blue images, a/ a green one; plus files every reader must skip."""
    base = os.path.join(root, split)
    png(os.path.join(base, "b", "1.png"), solid((255, 0, 0)))
    png(os.path.join(base, "b", "2.png"), solid((0, 0, 255), 12))
    png(os.path.join(base, "a", "x.png"), solid((0, 255, 0)))
    with open(os.path.join(base, "a", "notes.txt"), "w") as f:
        f.write("not an image")
    png(os.path.join(base, "a", ".hidden.png"), solid((1, 1, 1)))


def check_classes(images, labels, classes):
    assert classes == ["a", "b"] and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [0, 1, 1])
    np.testing.assert_array_equal(images[:, 0, 0], [[0, 255, 0], [255, 0, 0], [0, 0, 255]])
    assert images.shape == (3, 4, 4, 3) and images.dtype == np.uint8


def test_folder_with_class_subfolders(tmp_path):
    class_folder(tmp_path)
    check_classes(*load_images(str(tmp_path), 4, progress=False))


def test_zip_with_split_folders(tmp_path):
    class_folder(tmp_path / "tree", "train")
    png(str(tmp_path / "tree" / "test" / "b" / "t.png"), solid((9, 8, 7)))
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for root, _, files in os.walk(tmp_path / "tree"):
            for f in files:
                zf.write(os.path.join(root, f), os.path.relpath(os.path.join(root, f), tmp_path / "tree"))
        zf.writestr("__MACOSX/train/b/._1.png", b"resource fork")
    check_classes(*load_images(f"{path}:train", 4, progress=False))
    images, labels, classes = load_images(f"{path}:test", 4, progress=False)
    assert classes == ["b"] and labels.tolist() == [0] and images[0, 0, 0].tolist() == [9, 8, 7]
    with pytest.raises(ValueError, match=r"no images under 'val/'.*\['test/', 'train/'\]"):
        load_images(f"{path}:val", 4, progress=False)


def test_unlabelled_folder_single_file_and_parallel_reading(tmp_path):
    colours = np.random.default_rng(0).integers(0, 256, (150, 3))
    for i, c in enumerate(colours):
        png(str(tmp_path / f"{i:03d}.png"), solid(c, 2))
    serial = load_images(str(tmp_path), 2, workers=1, progress=False)
    parallel = load_images(str(tmp_path), 2, workers=2, progress=False)
    assert serial[1] is None and serial[2] == [] and parallel[1] is None
    np.testing.assert_array_equal(serial[0][:, 1, 1], colours)
    np.testing.assert_array_equal(parallel[0], serial[0])
    one = load_images(str(tmp_path / "007.png"), 2, progress=False)
    assert one[0].shape == (1, 2, 2, 3) and one[1] is None and (one[0] == colours[7]).all()


def cifar_batch(path, images, labels, key=b"labels"):
    with open(path, "wb") as f:
        pickle.dump({b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), key: labels,
                     b"batch_label": b"fake"}, f)


def write_cifar10(folder, per_batch=2):
    """The official cifar-10-batches-py layout; image i of the train set is filled with value i."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for b in range(5):
        vals = np.arange(b * per_batch, (b + 1) * per_batch)
        images = np.broadcast_to(vals[:, None, None, None], (per_batch, 32, 32, 3)).astype(np.uint8).copy()
        images[:, 0, 0] = [1, 2, 3]  # channel order check
        cifar_batch(os.path.join(folder, f"data_batch_{b + 1}"), images, list(vals % 10))
    cifar_batch(os.path.join(folder, "test_batch"), rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), [9, 0, 1])
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)


def test_cifar10_pickles(tmp_path):
    write_cifar10(tmp_path)
    images, labels, classes = load_images(str(tmp_path), 32)
    assert images.shape == (10, 32, 32, 3) and classes[:2] == ["class0", "class1"] and len(classes) == 10
    np.testing.assert_array_equal(labels, np.arange(10))
    np.testing.assert_array_equal(images[:, 5, 7, 0], np.arange(10))
    np.testing.assert_array_equal(images[3, 0, 0], [1, 2, 3])
    images, labels, _ = load_images(f"{tmp_path}:test", 16)
    assert images.shape == (3, 16, 16, 3) and labels.tolist() == [9, 0, 1]


def test_cifar100_pickles_use_fine_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    cifar_batch(tmp_path / "train", images, [5, 99, 0, 5], key=b"fine_labels")
    cifar_batch(tmp_path / "test", images[:1], [7], key=b"fine_labels")
    with open(tmp_path / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": []}, f)
    got, labels, classes = load_images(str(tmp_path), 32)
    np.testing.assert_array_equal(got, images)
    assert labels.tolist() == [5, 99, 0, 5] and len(classes) == 100 and classes[99] == "f99"
    assert load_images(f"{tmp_path}:test", 32)[1].tolist() == [7]


def test_imagenet_npz_is_channel_first_with_1_based_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "train_data_batch_1.npz", data=images.transpose(0, 3, 1, 2).reshape(3, -1),
             labels=[1, 1000, 2])
    got, labels, classes = load_images(str(tmp_path / "train_data_batch_1.npz"), 8)
    np.testing.assert_array_equal(got, images)
    assert labels.tolist() == [0, 999, 1] and len(classes) == 1000 and classes[0] == "1"
    small = load_images(str(tmp_path / "train_data_batch_1.npz"), 4)[0]
    assert small.shape == (3, 4, 4, 3)
    np.testing.assert_array_equal(small[:, 0, 0], np.floor(images[:, :2, :2].mean((1, 2)) + 0.5))  # box average


def test_uint8_npy(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    got, labels, classes = load_images(str(tmp_path / "x.npy"), 6)
    assert labels is None and classes == [] and np.array_equal(got, images)
    np.save(tmp_path / "f.npy", images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_images(str(tmp_path / "f.npy"), 6)


def test_original_release_token_files(tmp_path):
    prefix = str(tmp_path / "cifar10")
    x = np.random.default_rng(0).integers(0, 512, (5, 16)).astype(np.int64)
    np.save(prefix + "_trX.npy", x)
    np.save(prefix + "_trY.npy", np.eye(10, dtype=np.float32)[[3, 1, 4, 1, 5]])  # one-hot, as released
    X, Y = load_tokens(prefix, "tr")
    assert isinstance(X, np.memmap) and np.array_equal(X, x)
    assert Y.dtype == np.int64 and Y.tolist() == [3, 1, 4, 1, 5]
    np.save(prefix + "_vaX.npy", x.astype(np.uint16))
    X, Y = load_tokens(prefix, "va")
    assert Y is None and X.dtype == np.uint16


def test_load_tokens_errors(tmp_path):
    prefix = str(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match=r"d_teX\.npy.*quantize\.py"):
        load_tokens(prefix, "te")
    np.save(prefix + "_trX.npy", np.zeros((4, 2, 2), np.int64))
    with pytest.raises(ValueError, match=r"\[N, n_px\*n_px\]"):
        load_tokens(prefix, "tr")
    np.save(prefix + "_trX.npy", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="integers"):
        load_tokens(prefix, "tr")
    np.save(prefix + "_trX.npy", np.zeros((4, 4), np.uint16))
    np.save(prefix + "_trY.npy", np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="3 labels but .* 4 images"):
        load_tokens(prefix, "tr")
    with pytest.raises(ValueError, match="split"):
        load_tokens(prefix, "train")


# ---- bad inputs ----

def test_unreadable_image_is_named(tmp_path):
    png(str(tmp_path / "cat" / "ok.png"), solid((1, 2, 3)))
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=r"1 unreadable image.*broken\.jpg"):
        load_images(str(tmp_path), 4, progress=False)


def test_empty_missing_mixed_and_mislabelled_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_images(str(tmp_path / "empty"), 4)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_images(str(tmp_path / "nowhere"), 4)
    png(str(tmp_path / "mixed" / "top.png"), solid(0))
    png(str(tmp_path / "mixed" / "cls" / "in.png"), solid(0))
    with pytest.raises(ValueError, match="mixes"):
        load_images(str(tmp_path / "mixed"), 4)
    write_cifar10(tmp_path / "c10")
    cifar_batch(tmp_path / "c10" / "data_batch_3", np.zeros((3, 32, 32, 3), np.uint8), [1, 2])
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        load_images(str(tmp_path / "c10"), 32)
    np.savez(tmp_path / "x.npz", data=np.zeros((2, 12), np.uint8), labels=[1, 2, 3])
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        load_images(str(tmp_path / "x.npz"), 2)


# ---- download ----

@pytest.fixture
def cifar_server(tmp_path):
    """A local HTTP server holding a tiny cifar-10-python.tar.gz in the official layout; yields (url, md5)."""
    write_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", "cifar-10-batches-py")
    md5 = hashlib.md5((served / "cifar-10-python.tar.gz").read_bytes()).hexdigest()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz", md5
    server.shutdown()
    server.server_close()


def test_download_checks_the_md5_and_unpacks(tmp_path, cifar_server):
    url, md5 = cifar_server
    with pytest.raises(ValueError, match="md5 .* is not the expected 0{32}"):
        download_cifar("cifar10", str(tmp_path / "bad"), url=url, md5="0" * 32, progress=False)
    assert os.listdir(tmp_path / "bad") == []  # nothing corrupt left behind
    folder = download_cifar("cifar10", str(tmp_path / "data"), url=url, md5=md5, progress=False)
    assert folder == str(tmp_path / "data" / "cifar-10-batches-py")
    assert os.path.isfile(tmp_path / "data" / "cifar-10-python.tar.gz")
    assert load_images(folder, 32)[1].tolist() == list(range(10))


# ---- the built-in dataset, the grid, the command line ----

def test_shapes_are_deterministic_balanced_and_varied():
    images, labels, classes = make_shapes(40, 16, seed=5)
    again, labels_again, _ = make_shapes(40, 16, seed=5)
    assert images.shape == (40, 16, 16, 3) and images.dtype == np.uint8 and len(classes) == 10
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert np.bincount(labels).tolist() == [4] * 10
    assert not np.array_equal(images, make_shapes(40, 16, seed=6)[0])
    assert all(len(np.unique(im.reshape(-1, 3), axis=0)) >= 2 for im in images)  # the shape shows


def test_save_grid_lays_out_rows_and_columns(tmp_path):
    images = np.arange(2 * 3 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 3, 2, 2, 3)
    save_grid(images, str(tmp_path / "g.png"), pad=1, scale=2)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (1 + 2 * 5, 1 + 3 * 5, 3)
    assert (grid[0] == 255).all() and (grid[:, 5] == 255).all()
    np.testing.assert_array_equal(grid[6:10, 11:15], images[1, 2].repeat(2, 0).repeat(2, 1))


def test_holdout_is_seeded_and_disjoint():
    tr, va = holdout(100, 0.1, seed=0)
    assert len(va) == 10 and len(tr) == 90 and not set(tr) & set(va)
    assert sorted(np.concatenate([tr, va])) == list(range(100))
    assert np.array_equal(va, holdout(100, 0.1, seed=0)[1]) and not np.array_equal(va, holdout(100, 0.1, 1)[1])


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
    assert palette.shape == (16, 3)
    images, labels, _ = make_shapes(50, 8, seed=0)
    tr, va = holdout(50, 0.1, seed=0)
    np.testing.assert_array_equal(trX, encode(images[tr], palette, device="cpu"))
    np.testing.assert_array_equal(vaY, labels[va])
    np.testing.assert_array_equal(teX, encode(make_shapes(10, 8, seed=1)[0], palette, device="cpu"))
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


def test_cli_downloads_cifar(tmp_path, cifar_server, monkeypatch):
    url, md5 = cifar_server
    monkeypatch.setitem(quantize.CIFAR, "cifar10", (url, md5, "cifar-10-batches-py"))
    out = str(tmp_path / "c")
    quantize.main(["cifar10:train", "--test", "cifar10:test", "--download", str(tmp_path / "dl"), "--k", "8",
                   "--device", "cpu", "--val_frac", "0.2", "--out", out])
    assert load_tokens(out, "tr")[0].shape == (8, 1024) and load_tokens(out, "te")[1].tolist() == [9, 0, 1]
