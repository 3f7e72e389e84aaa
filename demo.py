"""
The completion panel of iGPT, live: the top rows of an image and the model finishing them several ways, drawn row
by row on a local web page. The page is Gradio's, an optional dependency: pip install -r requirements-demo.txt.

    python demo.py                                              # the main job's model (python pipeline.py)
    python demo.py --ckpt igpt_s.pt --data data/cifar10         # a converted release, CIFAR-10's test images
    python demo.py --ckpt out/ckpt.pt --palette kmeans_centers.npy --host 0.0.0.0 --port 8080

Then open http://127.0.0.1:7860. Upload an image or pick one of the test images (the token file DATA_teX.npy; by
default the data the checkpoint was trained on), choose how many of its rows to keep, the number of completions,
temperature, top-k and top-p, and press Complete; Sample draws unconditional images instead, Cancel stops either.
The grid is sample.py's (the kept rows with grey below, the completions, the original) and downloads as a PNG.

Generation goes through engine.Engine, the fused step on a GPU and the plain path elsewhere; one runs at a time,
the others wait in Gradio's queue. complete() is the whole of it without the page, for tests and scripts:

    for rows, grid in complete(Engine(model), palette, prime=tokens, rows_kept=8, n=4):
        ...  # grid: uint8 [1, 6, n_px, n_px, 3], the rows from `rows` on still grey
"""
import contextlib
import importlib.util
import os
import queue
import sys
import threading

import numpy as np
import torch
from PIL import Image, ImageOps

from common import (add_generation_options, argument_parser, generation_dtype, generation_fast, grid_image, log,
                    resolve_device, script, set_threads, switch)
from data import check_tokens, load_tokens, to_rgb, tokens_palette
from engine import Engine
from igpt import IGPT, check_generative
from palette import decode, encode, model_palette, one_palette
from sample import completions_layout, kept_rows, samples_layout

MAIN_JOB_CKPT = os.path.join("out", "shapes", "train", "ckpt.pt")  # what `python pipeline.py` trains
MAX_PIXELS = 50_000_000  # the largest upload decoded: a 50-megapixel photo, 150 MB as RGB
MAX_UPLOAD = "50mb"  # the largest file the server accepts
GALLERY = 16  # test images offered on the page
TILE = 192  # pixels a side of an image on the page, enlarged here pixel by pixel so browsers do not blur it


# ---- the demo without the page ----

def read_image(path, n_px, max_pixels=MAX_PIXELS):
    """An uploaded file as uint8 [n_px, n_px, 3] (data.to_rgb, after the EXIF orientation). A file that is no image
    PIL reads, or one of more than max_pixels pixels (known from its header, before anything is decoded), is a
    ValueError whose message the page shows."""
    name = os.path.basename(path)
    try:
        image = Image.open(path)  # reads the header only
    except Image.DecompressionBombError:
        raise ValueError(f"{name} is too large to decode: upload a smaller image") from None
    except Exception:  # PIL identified no format in it (its message names only the file)
        raise ValueError(f"{name} is not an image this demo can read: upload a PNG, JPEG, GIF, BMP, TIFF or WebP "
                         "file") from None
    with image:
        w, h = image.size
        if w * h > max_pixels:
            raise ValueError(f"{name} is {w}x{h} pixels, more than the {max_pixels:,} this demo decodes: "
                             "upload a smaller image")
        try:
            return to_rgb(ImageOps.exif_transpose(image), n_px)
        except Exception as e:  # a truncated or corrupt file fails only here, when its pixels are decoded
            raise ValueError(f"{name} could not be decoded: {e}") from None


def image_tokens(image, palette):
    """uint8 [n_px, n_px, 3] -> its tokens, int64 [n_px*n_px]: the nearest palette colour of each pixel. On the CPU,
    so that an upload during a generation makes no GPU call beside a CUDA graph being captured."""
    return encode(np.array(image[None]), palette, device="cpu")[0].astype(np.int64)  # writable, for torch


class Cancelled(Exception):
    """Raised inside the generation's progress callback to stop it."""


_generating = threading.Lock()  # one generation at a time in this process: the device, and the engine's buffers


def _rows_of(engine, n, prime, settings, generator):
    """Run engine.generate in a thread of its own and yield its tokens [n, done] as rows are finished, the last
    [n, n_px*n_px]. A row the caller has not taken when the next is done is dropped for it: the generation never
    waits for the page. Closing the generator stops the generation at its next position and waits for the thread."""
    n_px, T = engine.model.config.n_px, engine.model.config.block_size
    newest, stop = queue.Queue(maxsize=1), threading.Event()

    def hand(item):  # only this thread puts, so after taking a stale item there is room
        with contextlib.suppress(queue.Empty):
            newest.get_nowait()
        newest.put(item)

    def progress(done, total, tokens):
        if stop.is_set():
            raise Cancelled()
        if done % n_px == 0 and done < total:
            hand(tokens[:, :done].to("cpu", copy=True))  # a copy: the generation writes on

    def work():
        try:
            with _generating:
                hand(engine.generate(num_samples=n, prime=prime, generator=generator, progress=progress,
                                     **settings).cpu())
        except BaseException as e:  # handed to the caller's thread, which raises it there
            hand(e)

    thread = threading.Thread(target=work, name="demo-generate", daemon=True)
    thread.start()
    try:
        while True:
            item = newest.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.shape[1] == T:
                return
    finally:
        stop.set()
        thread.join()


def _check_settings(n_px, rows_kept, n, temperature, top_k, top_p, sampling=False):
    """ValueError, with what to choose instead, for settings complete() cannot use."""
    if not sampling and not 1 <= rows_kept < n_px:
        raise ValueError(f"keep between 1 and {n_px - 1} rows of the {n_px}")
    if n < 1:
        raise ValueError("ask for at least one image")
    if temperature <= 0:
        raise ValueError("the temperature must be positive")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError("top-k must be 0 (all colours) or more, top-p in (0, 1]")


def complete(engine, palette, prime=None, rows_kept=0, n=4, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    """n completions of the image `prime` (tokens [n_px*n_px]) from its top rows_kept rows, or with prime None n
    unconditional samples, generated through `engine` (an engine.Engine). Yields (rows, grid) as soon as the
    layout is known and then after every row drawn: grid is uint8 sample.py's layout, [1, n + 2, n_px, n_px, 3]
    (kept rows, completions, original) or [rows, cols, n_px, n_px, 3] of samples, with the rows from `rows` on
    still grey in every image drawn. The draws are engine.generate's for torch.Generator(device).manual_seed(seed),
    so a seed gives the same images again. Closing the generator (a cancel) stops the generation within a
    position."""
    model = engine.model
    n_px, T = model.config.n_px, model.config.block_size
    _check_settings(n_px, rows_kept, n, temperature, top_k, top_p, sampling=prime is None)
    original = None
    if prime is not None:
        prime = torch.as_tensor(np.asarray(prime, np.int64).reshape(-1))
        if prime.numel() != T or prime.min() < 0 or prime.max() >= len(palette):
            raise ValueError(f"an image to complete is {T} tokens in 0..{len(palette) - 1}")
        original = decode(prime[None].numpy(), palette)
        prime = prime[:rows_kept * n_px].repeat(n, 1)

    def layout(tokens):
        rows = tokens.shape[1] // n_px
        drawn = np.zeros((n, T), np.int64)
        drawn[:, :tokens.shape[1]] = tokens
        images = kept_rows(decode(drawn, palette), rows)
        grid = samples_layout(images) if original is None else completions_layout(original, images[None], rows_kept)
        return rows, grid

    yield layout(np.zeros((n, 0), np.int64) if prime is None else prime.numpy())
    settings = dict(temperature=temperature, top_k=top_k or None, top_p=top_p)
    device = model.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    with contextlib.closing(_rows_of(engine, n, prime, settings, generator)) as rows:
        for tokens in rows:
            yield layout(tokens.numpy())


# ---- loading: the checkpoint, its palette and test images ----

def load_model(path, palette_path=""):
    """(model, palette float32 [n_vocab, 3], its training config or {}) from a checkpoint, the palette from
    palette_path when given; SystemExit with the fix for a missing checkpoint or palette, or a BERT model."""
    if path == MAIN_JOB_CKPT and not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}: train the main job's model with `python pipeline.py` "
                         "(a few minutes on a CPU), or give one with --ckpt")
    try:
        model = IGPT.from_checkpoint(path)
        check_generative(model, path)  # now, not when Complete is first pressed
        return model, model_palette(model, palette_path, path), model.train_config
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(str(e)) from None


def load_test_images(prefix, model, palette, count=GALLERY):
    """The first `count` test images of the token files `prefix` (DATA_teX.npy), int64 tokens [N, n_px*n_px];
    SystemExit naming --data when they do not fit the model or are of another palette than `palette`, the one
    the model is drawn with (a token would be another colour in each)."""
    try:
        tokens, _ = load_tokens(prefix, "te")
        one_palette(tokens_palette(prefix), ("the model", palette))
        tokens = np.asarray(tokens[:count], np.int64)
        check_tokens(tokens, f"{prefix}_teX.npy", model.config.n_vocab, model.config.block_size)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--data: {e}") from None
    return tokens


# ---- the page ----

def build_app(engine, palette, test_tokens, max_images):
    """The Gradio page (gr.Blocks) over complete(); test_tokens [N, T] (N may be 0) are offered to pick from."""
    import gradio as gr

    n_px = engine.model.config.n_px
    scale = max(1, TILE // n_px)

    def page_image(grid):
        return grid_image(grid, scale=scale)

    def primed_view(tokens, rows_kept):
        return page_image(kept_rows(decode(tokens[None], palette), int(rows_kept)))

    def on_upload(path, rows_kept):
        if path is None:
            return gr.skip(), gr.skip()
        try:
            tokens = image_tokens(read_image(path, n_px), palette)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return tokens, primed_view(tokens, rows_kept)

    def on_pick(rows_kept, evt: gr.SelectData):
        tokens = test_tokens[evt.index]
        return tokens, primed_view(tokens, rows_kept)

    def on_rows(tokens, rows_kept):
        return gr.skip() if tokens is None else primed_view(tokens, rows_kept)

    def stream(prime, rows_kept, n, temperature, top_k, top_p, seed):
        what = "samples" if prime is None else "completions"
        try:
            with contextlib.closing(complete(engine, palette, prime, int(rows_kept), int(n), float(temperature),
                                             int(top_k), float(top_p), int(seed))) as partials:
                for rows, grid in partials:
                    yield page_image(grid), f"{what}: row {rows} of {n_px}"
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from None

    def on_complete(prime, *settings):
        if prime is None:
            raise gr.Error("upload an image or pick a test image first", print_exception=False)
        yield from stream(prime, *settings)

    def on_sample(rows_kept, *settings):
        yield from stream(None, rows_kept, *settings)

    with gr.Blocks(title="iGPT completions") as app:
        gr.Markdown(f"## iGPT: completions\nThe top rows of an image, and the model finishing them. This model "
                    f"sees {n_px}x{n_px} images in {len(palette)} colours.")
        prime = gr.State(None)
        with gr.Row():
            with gr.Column(scale=4):
                upload = gr.File(label="Upload an image", file_types=["image"], type="filepath", height=120)
                if len(test_tokens):
                    gallery = gr.Gallery([page_image(decode(t[None], palette)) for t in test_tokens],
                                         label="... or pick a test image", columns=4, height="auto",
                                         allow_preview=False, interactive=False, format="png")
            with gr.Column(scale=3):
                primed = gr.Image(label="What the model keeps", format="png", interactive=False)
                rows_kept = gr.Slider(1, n_px - 1, value=n_px // 2, step=1, label="Rows kept")
            with gr.Column(scale=3):
                n = gr.Slider(1, max_images, value=min(4, max_images), step=1, label="Completions (or samples)")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature")
                top_k = gr.Slider(0, len(palette), value=0, step=1, label="Top-k (0: every colour)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (1: every colour)")
                seed = gr.Number(0, precision=0, label="Seed")
                with gr.Row():
                    go = gr.Button("Complete", variant="primary")
                    sample = gr.Button("Sample")
                    cancel = gr.Button("Cancel", variant="stop")
        result = gr.Image(label="Kept rows | completions | original", format="png", interactive=False)
        status = gr.Markdown("")
        settings = [rows_kept, n, temperature, top_k, top_p, seed]
        upload.change(on_upload, [upload, rows_kept], [prime, primed])
        if len(test_tokens):
            gallery.select(on_pick, [rows_kept], [prime, primed])
        rows_kept.change(on_rows, [prime, rows_kept], [primed])
        # both use the model: one queue, one at a time
        completing = go.click(on_complete, [prime] + settings, [result, status], concurrency_limit=1,
                              concurrency_id="model")
        sampling = sample.click(on_sample, settings, [result, status], concurrency_limit=1, concurrency_id="model")
        # a toast, not the status line: a row already on its way could arrive after it
        cancel.click(lambda: gr.Info("Cancelled: the grid keeps the rows drawn so far"), None, None,
                     cancels=[completing, sampling])
    return app


def parse_args(argv=None):
    p = argument_parser(__doc__)
    p.add_argument("--ckpt", default=MAIN_JOB_CKPT, help="checkpoint (ours, or an original converted by convert.py)")
    p.add_argument("--palette", default="", help="palette .npy (k x 3 in [-1, 1]), or a checkpoint .pt whose "
                                                 "palette is taken; '': the --ckpt's")
    p.add_argument("--data", default="", help="token files whose test images (DATA_teX.npy) the page offers; '': "
                                              "the checkpoint's training data when its files are there")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    p.add_argument("--max_images", type=int, default=16, help="the most completions or samples one request draws")
    add_generation_options(p)
    args = p.parse_args(argv)
    if args.max_images < 1:
        p.error("--max_images must be at least 1")
    return args


@script
def main(argv=None):
    args = parse_args(argv)
    if importlib.util.find_spec("gradio") is None:
        raise SystemExit("the page needs Gradio: pip install -r requirements-demo.txt")
    device = resolve_device(args.device)
    set_threads(args.threads)
    model, palette, train_config = load_model(args.ckpt, args.palette)
    data = args.data or train_config.get("data", "")
    if args.data or os.path.isfile(f"{data}_teX.npy"):
        test_tokens = load_test_images(data, model, palette)
    else:
        test_tokens = np.zeros((0, model.config.block_size), np.int64)
        log("no test images to pick from: give token files with --data")
    dtype = generation_dtype(args.dtype, device)
    model = model.to(device=device, dtype=dtype).eval()
    try:
        engine = Engine(model, fast=generation_fast(args.fast), compile=switch(args.compile, device))
    except ValueError as e:
        raise SystemExit(f"--fast on: {e}") from None
    log(f"{args.ckpt}: {model.config.n_px}x{model.config.n_px} images, {len(test_tokens)} test images, on {device} "
        f"({'the fused step' if engine.fast else 'the plain path'})")
    app = build_app(engine, palette, test_tokens, args.max_images)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD, show_error=True)


if __name__ == "__main__":
    main(sys.argv[1:])
