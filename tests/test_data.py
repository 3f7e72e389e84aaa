"""data.py: image modes, every dataset reader, the CIFAR download, the built-in shapes, token files, the hold-out."""
import os
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

import data
from data import (SHAPE_COLOURS, SHAPES, begin_set, check_set, download_cifar, finish_set, holdout, load_images,
                  load_tokens, make_shapes, tokens_palette, to_rgb)
from fake_cifar import cifar_batch, write_cifar10
from traps import CreatesAFile


def png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


def solid(colour, size=8):
    return np.full((size, size, 3), colour, np.uint8)


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


def test_a_cifar_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    write_cifar10(tmp_path / "c10")
    marker = tmp_path / "ran"
    with open(tmp_path / "c10" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": CreatesAFile(str(marker)), b"labels": [0]}, f)
    with pytest.raises(ValueError, match=r"data_batch_1 is not a readable CIFAR file \(it asks for _?io\.open"):
        load_images(str(tmp_path / "c10"), 32)
    assert not marker.exists()


def test_a_truncated_cifar_pickle_is_named(tmp_path):
    write_cifar10(tmp_path / "c10")
    whole = (tmp_path / "c10" / "test_batch").read_bytes()
    (tmp_path / "c10" / "test_batch").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r"test_batch is not a readable CIFAR file .*--download"):
        load_images(f"{tmp_path / 'c10'}:test", 32)


def test_a_truncated_imagenet_npz_is_named(tmp_path):
    np.savez(tmp_path / "x.npz", data=np.zeros((2, 12), np.uint8), labels=[1, 2])
    whole = (tmp_path / "x.npz").read_bytes()
    (tmp_path / "x.npz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r"x\.npz is not a plain numeric \.npz \(it is cut short or damaged: .*\): "
                                         "fetch the downsampled-ImageNet batch again"):
        load_images(str(tmp_path / "x.npz"), 2)


def test_a_pickled_image_npy_is_refused_naming_the_file(tmp_path):
    np.save(tmp_path / "x.npy", np.array([CreatesAFile(str(tmp_path / "ran"))], object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"x\.npy is not a plain numeric \.npy \(it holds pickled Python objects, "
                                         r"or is not numpy's format\): save the images with np\.save, as uint8 "
                                         r"\[N, H, W, 3\]"):
        load_images(str(tmp_path / "x.npy"), 2)
    assert not (tmp_path / "ran").exists()


def test_a_zip_member_too_large_is_refused_before_it_is_unpacked(tmp_path, monkeypatch):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/ok.png", b"")
        zf.writestr("cat/big.png", bytes(5000))
    monkeypatch.setattr(data, "MAX_MEMBER_BYTES", 4096)
    unpacked = []
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name: unpacked.append(name) or b"")
    with pytest.raises(ValueError, match=r"cat/big\.png \(it unpacks to 5000 bytes, more than MAX_MEMBER_BYTES"):
        load_images(str(path), 4, workers=1, progress=False)
    assert unpacked == ["cat/ok.png"]


def test_a_folder_of_split_folders_is_not_read_as_classes(tmp_path):
    class_folder(tmp_path, "train")
    class_folder(tmp_path, "test")
    with pytest.raises(ValueError, match=r"holds the splits \['test', 'train'\], not classes: .*:train --test"):
        load_images(str(tmp_path), 4, progress=False)
    check_classes(*load_images(f"{tmp_path}:train", 4, progress=False))


# ---- download ----

def test_download_checks_the_md5_and_unpacks(tmp_path, cifar_server):
    url, md5 = cifar_server
    with pytest.raises(ValueError, match="md5 .* is not the expected 0{32}"):
        download_cifar("cifar10", str(tmp_path / "bad"), url=url, md5="0" * 32, progress=False)
    assert os.listdir(tmp_path / "bad") == []  # nothing corrupt left behind
    folder = download_cifar("cifar10", str(tmp_path / "data"), url=url, md5=md5, progress=False)
    assert folder == str(tmp_path / "data" / "cifar-10-batches-py")
    assert os.path.isfile(tmp_path / "data" / "cifar-10-python.tar.gz")
    assert load_images(folder, 32)[1].tolist() == list(range(10))


# ---- the built-in dataset ----

def test_shapes_are_deterministic_balanced_and_varied():
    images, labels, classes = make_shapes(40, 16, seed=5)
    again, labels_again, _ = make_shapes(40, 16, seed=5)
    assert images.shape == (40, 16, 16, 3) and images.dtype == np.uint8 and len(classes) == 10
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert np.bincount(labels).tolist() == [4] * 10
    assert not np.array_equal(images, make_shapes(40, 16, seed=6)[0])
    assert all(len(np.unique(im.reshape(-1, 3), axis=0)) >= 2 for im in images)  # the shape shows


def test_shape_labels_cycle_through_the_classes():
    _, labels, classes = make_shapes(25, 8, seed=0)
    assert classes == list(SHAPES) and labels.tolist() == list(range(10)) * 2 + list(range(5))


def test_shapes_have_two_of_the_palette_colours_and_hard_edges():
    images, _, _ = make_shapes(200, 16, seed=1)
    colours = {tuple(c) for c in SHAPE_COLOURS.values()}
    for im in images:
        used = {tuple(c) for c in np.unique(im.reshape(-1, 3), axis=0)}
        assert len(used) == 2 and used <= colours  # a shape and its background, no blend at the edges


def test_every_kind_of_shape_has_the_same_mean_image():
    images, labels, _ = make_shapes(4000, 8, seed=3)
    mean = np.mean(list(SHAPE_COLOURS.values()), axis=0)
    # 400 images a kind: chance moves a mean by about 5 (some 15 at the worst of 192 values); a kind whose colours
    # differed from the others' would be off by tens
    for k in range(len(SHAPES)):
        assert np.abs(images[labels == k].mean(0) - mean).max() < 30, SHAPES[k]


def test_shapes_lie_inside_the_image():
    images, labels, _ = make_shapes(300, 16, seed=2)
    for im, label in zip(images, labels):
        if SHAPES[label] in ("stripes_h", "stripes_v", "checker"):
            continue  # these fill the image
        border = np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]])
        corner = im[0, 0]
        assert (border == corner).all(), SHAPES[label]  # all background: the whole shape is in view


# ---- token files and the hold-out ----

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


def test_a_pickled_token_file_is_refused_naming_the_file_without_unpickling(tmp_path):
    prefix = str(tmp_path / "d")
    np.save(prefix + "_trX.npy", np.array([CreatesAFile(str(tmp_path / "ran"))], object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"^\S*d_trX\.npy is not a plain numeric \.npy \(it holds pickled Python "
                                         r"objects, or is not numpy's format\): write it again with quantize\.py$"):
        load_tokens(prefix, "tr")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("cut", ["X", "Y"])  # the tokens memory-mapped, the labels read whole
def test_a_truncated_token_file_is_refused_naming_the_file(tmp_path, cut):
    prefix = str(tmp_path / "d")
    np.save(prefix + "_trX.npy", np.zeros((50, 16), np.uint16))
    np.save(prefix + "_trY.npy", np.zeros(50, np.int64))
    whole = open(f"{prefix}_tr{cut}.npy", "rb").read()
    open(f"{prefix}_tr{cut}.npy", "wb").write(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=rf"d_tr{cut}\.npy is not a plain numeric \.npy \(it is cut short or damaged"
                                         r": .*\): write it again with quantize\.py$"):
        load_tokens(prefix, "tr")


def test_labels_that_are_not_numbers_are_refused_naming_the_file(tmp_path):
    prefix = str(tmp_path / "d")
    np.save(prefix + "_trX.npy", np.zeros((2, 4), np.uint16))
    np.save(prefix + "_trY.npy", np.array(["cat", "dog"]))
    with pytest.raises(ValueError, match=r"d_trY\.npy is not a plain numeric \.npy \(it holds <U3, not numbers\)"):
        load_tokens(prefix, "tr")


def test_labels_in_a_column_are_integer_labels(tmp_path):
    prefix = str(tmp_path / "d")
    np.save(prefix + "_trX.npy", np.zeros((3, 4), np.uint16))
    np.save(prefix + "_trY.npy", np.array([[2], [0], [1]]))
    assert load_tokens(prefix, "tr")[1].tolist() == [2, 0, 1]
    np.save(prefix + "_trY.npy", np.array([[2, 1], [0, 0], [1, 3]]))
    with pytest.raises(ValueError, match="one-hot"):
        load_tokens(prefix, "tr")


def test_an_empty_split_is_a_clear_error(tmp_path):
    prefix = str(tmp_path / "d")
    np.save(prefix + "_vaX.npy", np.zeros((0, 4), np.uint16))
    with pytest.raises(ValueError, match=r"d_vaX\.npy holds no images \(quantize\.py --val_frac 0"):
        load_tokens(prefix, "va")


def test_a_token_file_or_a_folder_given_as_the_prefix_names_the_prefix(tmp_path):
    prefix = str(tmp_path / "cifar10")
    np.save(prefix + "_trX.npy", np.zeros((3, 4), np.uint16))
    with pytest.raises(ValueError, match=f"give the prefix of the files instead: '{prefix}'"):
        load_tokens(prefix + "_trX.npy", "tr")
    with pytest.raises(FileNotFoundError, match=f"holds the prefixes \\['{prefix}'\\]"):
        load_tokens(str(tmp_path), "tr")


def write_set(prefix, n=3):
    begin_set(prefix)
    paths = [f"{prefix}_trX.npy", f"{prefix}_trY.npy", f"{prefix}_palette.npy"]
    np.save(paths[0], np.arange(4 * n, dtype=np.uint16).reshape(n, 4))
    np.save(paths[1], np.arange(n))
    np.save(paths[2], np.zeros((16, 3), np.float32))
    finish_set(prefix, paths)
    return paths


def test_the_files_of_a_set_are_read_only_together(tmp_path):
    prefix = str(tmp_path / "d")
    write_set(prefix)
    assert load_tokens(prefix, "tr")[1].tolist() == [0, 1, 2]
    path, palette = tokens_palette(prefix)
    assert path == prefix + "_palette.npy" and np.array_equal(palette, np.zeros((16, 3), np.float32))
    np.save(prefix + "_trY.npy", np.array([2, 1, 0]))  # the same size, other bytes
    with pytest.raises(ValueError, match=r"d_trY\.npy is not the file .*d_manifest\.json lists"):
        load_tokens(prefix, "tr")
    write_set(prefix)
    np.save(prefix + "_vaX.npy", np.zeros((2, 4), np.uint16))
    with pytest.raises(ValueError, match=r"d_vaX\.npy is not one of the files .* lists"):
        load_tokens(prefix, "va")
    begin_set(prefix)  # a run that writes the set again, cut short
    for split in ("tr", "va"):
        with pytest.raises(ValueError, match="did not finish"):
            load_tokens(prefix, split)
    with pytest.raises(ValueError, match="did not finish"):
        tokens_palette(prefix)


def test_files_without_a_manifest_are_read_as_they_are(tmp_path):
    prefix = str(tmp_path / "d")
    write_set(prefix)
    os.remove(prefix + "_manifest.json")
    np.save(prefix + "_trY.npy", np.array([2, 1, 0]))
    assert load_tokens(prefix, "tr")[1].tolist() == [2, 1, 0]
    check_set(prefix, [str(tmp_path / "kmeans_centers.npy")])  # not a file of the set


def test_holdout_is_seeded_and_disjoint():
    tr, va = holdout(100, 0.1, seed=0)
    assert len(va) == 10 and len(tr) == 90 and not set(tr) & set(va)
    assert sorted(np.concatenate([tr, va])) == list(range(100))
    assert np.array_equal(va, holdout(100, 0.1, seed=0)[1]) and not np.array_equal(va, holdout(100, 0.1, 1)[1])


def test_check_tokens_names_the_source_and_what_does_not_fit():
    data.check_tokens(np.zeros((0, 16), np.uint16), "empty", 4, 16)  # no image: nothing out of range
    data.check_tokens(np.full((2, 16), 3, np.uint16), "ok", 4, 16)
    with pytest.raises(ValueError, match=r"^x\.npy: token images of shape \[2, 9\], but the model reads \[N, 16\] "
                                         r"\(4x4\); quantize the data at n_px=4$"):
        data.check_tokens(np.zeros((2, 9), np.uint16), "x.npy", 4, 16)
    with pytest.raises(ValueError, match=r"^x\.npy: token values span 0\.\.4 but the palette has 4 colours \(0\.\.3\)"):
        data.check_tokens(np.array([[0, 4]]), "x.npy", 4)
