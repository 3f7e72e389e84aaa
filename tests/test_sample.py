"""sample.py: grids of samples and completions, reproducible by seed, and clear errors for bad inputs."""
import numpy as np
import pytest
import torch
from PIL import Image

import sample
from igpt import generate, save_checkpoint
from palette import decode
from tiny import palette, tiny_model
from traps import CreatesAFile

N_PX, N_VOCAB, SCALE, PAD = 4, 16, 2, 2


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, tiny_model(), palette=palette())
    return str(path)


def run(*args, device="cpu"):
    return sample.main([str(a) for a in args] + ["--device", device])


def tile(grid, row, col):
    """The image at (row, col) of a grid written by save_grid with scale SCALE, pixels back at 1x1."""
    size = N_PX * SCALE + PAD
    y, x = PAD + row * size, PAD + col * size
    return grid[y:y + N_PX * SCALE:SCALE, x:x + N_PX * SCALE:SCALE]


def test_unconditional_grid_shows_the_sampled_tokens_and_the_seed_reproduces_them(ckpt, tmp_path):
    run("--ckpt", ckpt, "--out", tmp_path / "a", "--num_samples", 5, "--batch_size", 2, "--scale", SCALE, "--seed", 3)
    tokens = np.load(tmp_path / "a" / "samples.npy")
    assert tokens.shape == (5, N_PX * N_PX) and tokens.dtype == np.uint16
    grid = np.asarray(Image.open(tmp_path / "a" / "samples.png"))
    images = decode(tokens, palette())
    for i in range(5):  # 5 samples lie in rows of ceil(sqrt(5)) = 3
        np.testing.assert_array_equal(tile(grid, i // 3, i % 3), images[i])
    run("--ckpt", ckpt, "--out", tmp_path / "b", "--num_samples", 5, "--batch_size", 2, "--seed", 3)
    run("--ckpt", ckpt, "--out", tmp_path / "c", "--num_samples", 5, "--batch_size", 2, "--seed", 4)
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "samples.npy"), tokens)
    assert not np.array_equal(np.load(tmp_path / "c" / "samples.npy"), tokens)


def test_the_tokens_are_generate_with_the_seeded_generator(ckpt, tmp_path):
    run("--ckpt", ckpt, "--out", tmp_path / "a", "--num_samples", 3, "--seed", 9, "--top_k", 4)
    expected = generate(tiny_model(), num_samples=3, top_k=4, generator=torch.Generator().manual_seed(9))
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "samples.npy"), expected.numpy())


def test_completions_keep_the_primed_rows_and_the_grid_shows_kept_completions_original(ckpt, tmp_path):
    originals = np.random.default_rng(0).integers(0, N_VOCAB, (3, N_PX * N_PX)).astype(np.uint16)
    np.save(tmp_path / "teX.npy", originals)
    run("--ckpt", ckpt, "--prime", tmp_path / "teX.npy", "--num_prime", 2, "--num_samples", 3, "--prime_rows", 1,
        "--out", tmp_path / "c", "--scale", SCALE)
    tokens = np.load(tmp_path / "c" / "completions.npy")
    assert tokens.shape == (6, N_PX * N_PX)
    np.testing.assert_array_equal(tokens[:, :N_PX], np.repeat(originals[:2, :N_PX], 3, axis=0))
    grid = np.asarray(Image.open(tmp_path / "c" / "completions.png"))
    for r in range(2):
        kept = tile(grid, r, 0)
        np.testing.assert_array_equal(kept[:1], decode(originals[r:r + 1], palette())[0][:1])
        assert (kept[1:] == 128).all()  # grey where the model fills in
        for j in range(3):
            np.testing.assert_array_equal(tile(grid, r, 1 + j), decode(tokens[3 * r + j:3 * r + j + 1], palette())[0])
        np.testing.assert_array_equal(tile(grid, r, 4), decode(originals[r:r + 1], palette())[0])


def test_classes_in_turn_takes_the_first_of_each_class_then_the_second():
    labels = np.array([2, 0, 0, 1, 2, 0, 1])
    assert sample.classes_in_turn(labels, 5).tolist() == [1, 3, 0, 2, 6]
    assert sample.classes_in_turn(labels, 10).tolist() == [1, 3, 0, 2, 6, 4, 5]  # all there are


def test_prime_classes_completes_an_image_of_each_class_from_the_labels_beside_the_tokens(ckpt, tmp_path):
    originals = np.random.default_rng(0).integers(0, N_VOCAB, (6, N_PX * N_PX)).astype(np.uint16)
    np.save(tmp_path / "d_teX.npy", originals)
    np.save(tmp_path / "d_teY.npy", np.array([0, 0, 0, 1, 1, 2]))  # sorted by class, as class folders are
    run("--ckpt", ckpt, "--prime", tmp_path / "d_teX.npy", "--num_prime", 4, "--prime_classes", "--num_samples", 1,
        "--prime_rows", 2, "--out", tmp_path / "c")
    kept = np.load(tmp_path / "c" / "completions.npy")[:, :2 * N_PX]
    np.testing.assert_array_equal(kept, originals[[0, 3, 5, 1], :2 * N_PX])
    (tmp_path / "d_teY.npy").unlink()
    with pytest.raises(SystemExit, match="--prime_classes needs the labels of .*d_teY.npy is missing"):
        run("--ckpt", ckpt, "--prime", tmp_path / "d_teX.npy", "--prime_classes", "--out", tmp_path / "e")


def test_prime_classes_reads_one_hot_labels_as_the_original_release_stores_them(ckpt, tmp_path):
    originals = np.random.default_rng(0).integers(0, N_VOCAB, (6, N_PX * N_PX)).astype(np.uint16)
    np.save(tmp_path / "d_teX.npy", originals)
    np.save(tmp_path / "d_teY.npy", np.eye(3, dtype=np.float32)[[0, 0, 0, 1, 1, 2]])
    run("--ckpt", ckpt, "--prime", tmp_path / "d_teX.npy", "--num_prime", 3, "--prime_classes", "--num_samples", 1,
        "--prime_rows", 2, "--out", tmp_path / "c")
    np.testing.assert_array_equal(np.load(tmp_path / "c" / "completions.npy")[:, :2 * N_PX],
                                  originals[[0, 3, 5], :2 * N_PX])


def test_prime_images_are_quantized_with_the_palette(ckpt, tmp_path):
    colours = np.clip(np.rint(127.5 * (palette() + 1)), 0, 255).astype(np.uint8)
    want = np.random.default_rng(1).integers(0, N_VOCAB, N_PX * N_PX)
    Image.fromarray(colours[want].reshape(N_PX, N_PX, 3)).save(tmp_path / "p.png")
    run("--ckpt", ckpt, "--prime", tmp_path / "p.png", "--num_samples", 1, "--prime_rows", 2, "--out", tmp_path / "c")
    np.testing.assert_array_equal(np.load(tmp_path / "c" / "completions.npy")[0, :2 * N_PX], want[:2 * N_PX])


def test_existing_outputs_are_not_overwritten_without_force(ckpt, tmp_path):
    run("--ckpt", ckpt, "--out", tmp_path / "a", "--num_samples", 1)
    before = (tmp_path / "a" / "samples.png").read_bytes()
    with pytest.raises(SystemExit, match="samples.png exists.*--force"):
        run("--ckpt", ckpt, "--out", tmp_path / "a", "--num_samples", 1, "--seed", 1)
    assert (tmp_path / "a" / "samples.png").read_bytes() == before
    run("--ckpt", ckpt, "--out", tmp_path / "a", "--num_samples", 1, "--seed", 1, "--force")


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at .*nope.pt"):
        run("--ckpt", tmp_path / "nope.pt", "--out", tmp_path / "a")


def test_a_bert_checkpoint_is_refused_with_the_reason(tmp_path):
    save_checkpoint(tmp_path / "bert.pt", tiny_model(bert=True), palette=palette())
    with pytest.raises(SystemExit, match="^sample.py: [^ ]*bert.pt is a BERT model, which cannot generate: .* no "
                                         "order"):
        run("--ckpt", tmp_path / "bert.pt", "--out", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.pt"]


def test_a_checkpoint_without_palette_asks_for_one(tmp_path):
    path = tmp_path / "bare.pt"
    save_checkpoint(path, tiny_model())
    with pytest.raises(SystemExit, match="holds no palette: give one with --palette"):
        run("--ckpt", path, "--out", tmp_path / "a")
    np.save(tmp_path / "p.npy", palette())
    run("--ckpt", path, "--palette", tmp_path / "p.npy", "--out", tmp_path / "a", "--num_samples", 1)


def test_the_palette_may_be_another_checkpoints(ckpt, tmp_path):
    save_checkpoint(tmp_path / "bare.pt", tiny_model())
    run("--ckpt", tmp_path / "bare.pt", "--palette", ckpt, "--out", tmp_path / "a", "--num_samples", 1, "--scale",
        SCALE)
    grid = np.asarray(Image.open(tmp_path / "a" / "samples.png"))
    np.testing.assert_array_equal(tile(grid, 0, 0), decode(np.load(tmp_path / "a" / "samples.npy"), palette())[0])


def test_a_palette_of_the_wrong_size_is_refused(ckpt, tmp_path):
    np.save(tmp_path / "p.npy", palette(8))
    with pytest.raises(SystemExit, match=r"palette has shape \[8, 3\] but the model needs \[16, 3\]"):
        run("--ckpt", ckpt, "--palette", tmp_path / "p.npy", "--out", tmp_path / "a")


@pytest.mark.parametrize("prime, message", [
    (np.zeros((2, 9), np.uint16), r"token images of shape \[2, 9\], but the model reads \[N, 16\] \(4x4\)"),
    (np.full((2, 16), 16, np.uint16), r"token values span 16..16 but the palette has 16 colours \(0..15\)"),
    (np.zeros((2, 16), np.float32), r"expected integer tokens"),
])
def test_bad_prime_tokens_are_refused(ckpt, tmp_path, prime, message):
    np.save(tmp_path / "p.npy", prime)
    with pytest.raises(SystemExit, match=message):
        run("--ckpt", ckpt, "--prime", tmp_path / "p.npy", "--out", tmp_path / "a")


def test_a_pickled_prime_file_is_refused_naming_it_without_unpickling(ckpt, tmp_path):
    np.save(tmp_path / "p.npy", np.array([CreatesAFile(str(tmp_path / "ran"))], object), allow_pickle=True)
    with pytest.raises(SystemExit, match=r"^sample\.py: \S*p\.npy is not a plain numeric \.npy \(it holds pickled "
                                         r"Python objects, or is not numpy's format\): give integer tokens"):
        run("--ckpt", ckpt, "--prime", tmp_path / "p.npy", "--out", tmp_path / "a")
    assert not (tmp_path / "ran").exists()


def test_prime_rows_must_leave_something_to_complete(ckpt, tmp_path):
    np.save(tmp_path / "p.npy", np.zeros((1, 16), np.uint16))
    with pytest.raises(SystemExit, match=r"--prime_rows must lie in 1..3"):
        run("--ckpt", ckpt, "--prime", tmp_path / "p.npy", "--prime_rows", 4, "--out", tmp_path / "a")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_tokens_are_the_engines(ckpt, tmp_path, capsys):
    from engine import Engine
    run("--ckpt", ckpt, "--out", tmp_path / "g", "--num_samples", 3, "--seed", 9, "--dtype", "float32", device="cuda")
    assert "the fused step" in capsys.readouterr().out  # sample.py took the engine's fused path
    engine = Engine(tiny_model().cuda())
    expected = engine.generate(num_samples=3, generator=torch.Generator("cuda").manual_seed(9))
    np.testing.assert_array_equal(np.load(tmp_path / "g" / "samples.npy"), expected.cpu().numpy())


def test_prime_tokens_of_another_palette_are_refused(ckpt, tmp_path):
    np.save(tmp_path / "d_teX.npy", np.zeros((2, 16), np.uint16))
    np.save(tmp_path / "d_palette.npy", palette(seed=1))
    with pytest.raises(SystemExit, match=r"palettes of .*d_palette\.npy \(16 colours\) and the model"):
        run("--ckpt", ckpt, "--prime", tmp_path / "d_teX.npy", "--out", tmp_path / "a")
    np.save(tmp_path / "d_palette.npy", palette())
    run("--ckpt", ckpt, "--prime", tmp_path / "d_teX.npy", "--out", tmp_path / "a", "--num_prime", 1)
