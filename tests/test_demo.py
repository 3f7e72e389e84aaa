"""demo.py: the completion function behind the page (no Gradio needed), uploads, loading, and the page itself
when Gradio is installed."""
import importlib.util
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import demo
from engine import Engine
from igpt import generate, save_checkpoint
from palette import decode
from tiny import palette, tiny_model

N_PX, N_VOCAB = 4, 16
T = N_PX * N_PX


def prime_image(seed=3):
    return np.random.default_rng(seed).integers(0, N_VOCAB, T)


class Watched:
    """An engine whose generate goes through a real Engine (the plain path) while a hook sees every progress call,
    as hook(done, progress, tokens); the positions reached are kept in `done`."""

    def __init__(self, model, hook=None):
        self.engine, self.model, self.hook, self.done = Engine(model, fast=False), model, hook, []

    def generate(self, progress=None, **kwargs):
        def watched(done, total, tokens):
            self.done.append(done)
            progress(done, total, tokens)
            if self.hook is not None:
                self.hook(done, progress, tokens)
        return self.engine.generate(progress=watched, **kwargs)


def test_completions_keep_the_primed_rows_exactly_and_show_kept_completions_original():
    prime, rows_kept, n = prime_image(), 2, 3
    *_, (rows, grid) = demo.complete(Engine(tiny_model(), fast=False), palette(), prime, rows_kept, n)
    original = decode(prime[None], palette())[0]
    assert rows == N_PX and grid.shape == (1, n + 2, N_PX, N_PX, 3)
    np.testing.assert_array_equal(grid[0, 0, :rows_kept], original[:rows_kept])
    assert (grid[0, 0, rows_kept:] == 128).all()
    for completion in grid[0, 1:n + 1]:
        np.testing.assert_array_equal(completion[:rows_kept], original[:rows_kept])
    np.testing.assert_array_equal(grid[0, -1], original)


@pytest.mark.parametrize("n", [1, 5])
def test_completions_are_the_seeded_generate_of_the_kept_rows(n):
    model, prime = tiny_model(), prime_image()
    *_, (_, grid) = demo.complete(Engine(model, fast=False), palette(), prime, 1, n, temperature=0.8, top_k=5,
                                  seed=7)
    want = generate(model, prime=torch.as_tensor(prime[:N_PX]).repeat(n, 1), temperature=0.8, top_k=5,
                    generator=torch.Generator().manual_seed(7))
    assert grid.shape[1] == n + 2
    np.testing.assert_array_equal(grid[0, 1:n + 1], decode(want.numpy(), palette()))


def test_samples_are_the_seeded_generate_in_a_square_grid():
    model = tiny_model()
    *_, (rows, grid) = demo.complete(Engine(model, fast=False), palette(), None, n=5, top_p=0.9, seed=2)
    want = decode(generate(model, num_samples=5, top_p=0.9, generator=torch.Generator().manual_seed(2)).numpy(),
                  palette())
    assert rows == N_PX and grid.shape == (2, 3, N_PX, N_PX, 3)
    np.testing.assert_array_equal(grid.reshape(6, N_PX, N_PX, 3)[:5], want)
    assert (grid[1, 2] == 0).all()


def test_partial_results_stream_row_by_row_in_order_while_the_generation_runs():
    taken = threading.Semaphore(0)  # released by the test for each row it has received

    def wait_for_the_page(done, progress, tokens):
        if done % N_PX == 0 and done < T:
            assert taken.acquire(timeout=30), "the row never reached the caller"

    engine, rows_kept = Watched(tiny_model(), wait_for_the_page), 1
    partials = []
    for rows, grid in demo.complete(engine, palette(), prime_image(), rows_kept, n=2):
        partials.append((rows, grid.copy(), max(engine.done, default=0)))
        if rows > rows_kept:
            taken.release()
    assert [rows for rows, _, _ in partials] == list(range(rows_kept, N_PX + 1))
    final = partials[-1][1]
    for rows, grid, reached in partials[:-1]:
        assert reached == (rows * N_PX if rows > rows_kept else 0)  # it came while the generation stood there
        np.testing.assert_array_equal(grid[0, 1:3, :rows], final[0, 1:3, :rows])
        assert (grid[0, 1:3, rows:] == 128).all()


def test_closing_the_stream_stops_the_generation_at_the_next_position():
    hold = 2 * N_PX + 1  # the first position after the first row drawn

    def spin_until_stopped(done, progress, tokens):
        while done == hold:  # progress raises once the caller has closed the stream
            progress(done, T, tokens)

    engine = Watched(tiny_model(), spin_until_stopped)
    stream = demo.complete(engine, palette(), prime_image(), 1, n=2)
    assert [next(stream)[0], next(stream)[0]] == [1, 2]
    stream.close()
    assert max(engine.done) == hold
    assert demo._generating.acquire(blocking=False)  # the generation thread has let go of the model
    demo._generating.release()


def test_an_error_in_the_generation_reaches_the_caller():
    def fail(done, progress, tokens):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        list(demo.complete(Watched(tiny_model(), fail), palette(), prime_image(), 1, n=1))


@pytest.mark.parametrize("settings, message", [
    (dict(rows_kept=0), r"keep between 1 and 3 rows of the 4"),
    (dict(rows_kept=4), r"keep between 1 and 3 rows"),
    (dict(n=0), r"at least one image"),
    (dict(temperature=0), r"temperature must be positive"),
    (dict(top_p=0), r"top-p in \(0, 1\]"),
    (dict(top_k=-1), r"top-k must be 0"),
])
def test_bad_settings_are_refused_with_what_to_choose(settings, message):
    settings = {"rows_kept": 2, **settings}
    with pytest.raises(ValueError, match=message):
        next(demo.complete(Engine(tiny_model(), fast=False), palette(), prime_image(), **settings))


def test_an_image_of_the_wrong_size_or_colours_is_refused():
    engine = Engine(tiny_model(), fast=False)
    for prime in (np.zeros(T - 1, np.int64), np.full(T, N_VOCAB)):
        with pytest.raises(ValueError, match=r"an image to complete is 16 tokens in 0..15"):
            next(demo.complete(engine, palette(), prime, 2))


# ---- uploads ----

def test_an_upload_is_read_like_the_datasets_and_quantized_with_the_palette(tmp_path):
    colours = np.clip(np.rint(127.5 * (palette() + 1)), 0, 255).astype(np.uint8)
    want = prime_image()
    Image.fromarray(colours[want].reshape(N_PX, N_PX, 3).repeat(3, 0).repeat(3, 1)).save(tmp_path / "p.png")
    image = demo.read_image(str(tmp_path / "p.png"), N_PX)
    np.testing.assert_array_equal(demo.image_tokens(image, palette()), want)


@pytest.mark.parametrize("content, message", [
    (b"name,value\n1,2\n", r"notes.png is not an image this demo can read"),
    (b"", r"notes.png is not an image this demo can read"),
])
def test_a_file_that_is_no_image_is_refused_with_a_message(tmp_path, content, message):
    (tmp_path / "notes.png").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        demo.read_image(str(tmp_path / "notes.png"), N_PX)


def test_a_truncated_image_is_refused_with_a_message(tmp_path):
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(ValueError, match=r"cut.png could not be decoded"):
        demo.read_image(str(tmp_path / "cut.png"), N_PX)


def test_a_huge_image_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(demo, "to_rgb", lambda *a: pytest.fail("the pixels were decoded"))
    with pytest.raises(ValueError, match=r"big.png is 300x200 pixels, more than the 50,000 this demo decodes"):
        demo.read_image(str(tmp_path / "big.png"), N_PX, max_pixels=50_000)


def test_an_image_beyond_pils_bomb_limit_is_refused_with_a_message(tmp_path, monkeypatch):
    Image.new("L", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses more than twice this at open
    with pytest.raises(ValueError, match=r"bomb.png is too large to decode"):
        demo.read_image(str(tmp_path / "bomb.png"), N_PX)


# ---- loading ----

def test_a_checkpoint_without_palette_asks_for_one_and_takes_it_from_palette(tmp_path):
    save_checkpoint(tmp_path / "bare.pt", tiny_model())
    with pytest.raises(SystemExit, match=r"bare.pt holds no palette: give one with --palette"):
        demo.load_model(str(tmp_path / "bare.pt"))
    np.save(tmp_path / "p.npy", palette())
    _, got, _ = demo.load_model(str(tmp_path / "bare.pt"), str(tmp_path / "p.npy"))
    np.testing.assert_array_equal(got, palette())


def test_the_missing_main_job_checkpoint_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"no checkpoint at out/shapes/train/ckpt.pt: .*python pipeline.py"):
        demo.load_model(demo.MAIN_JOB_CKPT)


def test_another_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"^no checkpoint at .*nope.pt"):
        demo.load_model(str(tmp_path / "nope.pt"))


def test_test_images_that_do_not_fit_the_model_are_refused(tmp_path):
    np.save(tmp_path / "d_teX.npy", np.zeros((3, 9), np.uint16))
    with pytest.raises(SystemExit, match=r"^--data: .*d_teX.npy: token images of shape \[3, 9\], but the model reads "
                                         r"\[N, 16\] \(4x4\); quantize the data at n_px=4$"):
        demo.load_test_images(str(tmp_path / "d"), tiny_model(), palette())


def test_test_images_of_another_palette_are_refused_in_one_line(tmp_path):
    np.save(tmp_path / "d_teX.npy", np.zeros((3, T), np.uint16))
    np.save(tmp_path / "d_palette.npy", palette(seed=1))
    with pytest.raises(SystemExit, match=r"^--data: the palettes of .*d_palette.npy \(16 colours\) and the model "
                                         r"\(16 colours\) differ: .*quantize.py --palette CHECKPOINT.pt\)$"):
        demo.load_test_images(str(tmp_path / "d"), tiny_model(), palette())


def test_test_images_are_the_first_of_the_token_file(tmp_path):
    tokens = np.random.default_rng(0).integers(0, N_VOCAB, (5, T)).astype(np.uint16)
    np.save(tmp_path / "d_teX.npy", tokens)
    np.testing.assert_array_equal(demo.load_test_images(str(tmp_path / "d"), tiny_model(), palette(), count=3),
                                  tokens[:3])


def test_without_gradio_the_script_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    with pytest.raises(SystemExit, match=r"^demo.py: the page needs Gradio: pip install -r requirements-demo.txt$"):
        demo.main([])


@pytest.fixture
def gradio_found(monkeypatch):
    """main() finds Gradio, installed or not: for what it does before it builds the page."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "gradio" else real(name, *a))


def test_a_library_error_at_start_up_is_one_line_naming_the_flag(gradio_found):
    with pytest.raises(SystemExit, match=r"^demo.py: --threads -1: give a number of threads, or 0 to have it "
                                         r"chosen$"):
        demo.main(["--threads", "-1", "--device", "cpu"])


def test_a_bert_checkpoint_is_refused_at_start_up(tmp_path, gradio_found):
    save_checkpoint(tmp_path / "bert.pt", tiny_model(bert=True), palette=palette())
    threads = str(torch.get_num_threads())  # main sets them before it loads the model: as they are
    with pytest.raises(SystemExit, match=r"^demo.py: .*bert.pt is a BERT model, which cannot generate: .* "
                                         r"give an autoregressive checkpoint$"):
        demo.main(["--ckpt", str(tmp_path / "bert.pt"), "--device", "cpu", "--threads", threads])


def test_the_script_takes_the_cpu_threads_it_is_given(monkeypatch, gradio_found):
    seen = []

    def load_model(*args):  # by then the threads are set; the page itself is not built
        seen.append(torch.get_num_threads())
        raise SystemExit("stopped before the page")
    monkeypatch.setattr(demo, "load_model", load_model)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(SystemExit, match="stopped before the page"):
            demo.main(["--threads", "1", "--device", "cpu"])
    finally:
        torch.set_num_threads(before)
    assert seen == [1]


# ---- the page, where Gradio is installed ----

@pytest.fixture
def page():
    """The page served on a free local port with a tiny model; yields a gradio_client Client of it."""
    if importlib.util.find_spec("gradio") is None:
        pytest.skip("Gradio is not installed (pip install -r requirements-demo.txt)")
    from gradio_client import Client
    tests = np.random.default_rng(0).integers(0, N_VOCAB, (3, T))
    app = demo.build_app(Engine(tiny_model(), fast=False), palette(), tests, max_images=4)
    app.queue(default_concurrency_limit=1)
    _, url, _ = app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, max_file_size="1mb")
    try:
        yield Client(url, verbose=False)
    finally:
        app.close()


def test_the_page_streams_completions_of_an_upload(page, tmp_path):
    from gradio_client import handle_file
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "red.png")
    page.predict(handle_file(str(tmp_path / "red.png")), 2, api_name="/on_upload")
    job = page.submit(2, 3, 1.0, 0, 1.0, 0, api_name="/on_complete")
    updates = list(job)
    assert len(updates) >= 2 and updates[-1][1] == f"completions: row {N_PX} of {N_PX}"
    grid = np.asarray(Image.open(updates[-1][0]))
    scale = demo.TILE // N_PX
    assert grid.shape == (2 + (N_PX * scale + 2), 2 + 5 * (N_PX * scale + 2), 3)


def test_the_page_shows_a_message_for_an_upload_that_is_no_image(page, tmp_path):
    from gradio_client import handle_file
    (tmp_path / "notes.png").write_bytes(b"name,value\n")
    with pytest.raises(Exception, match=r"notes.png is not an image this demo can read"):
        page.predict(handle_file(str(tmp_path / "notes.png")), 2, api_name="/on_upload")
