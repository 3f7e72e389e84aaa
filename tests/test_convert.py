"""convert.py: the original -> igpt mapping (logits against TensorFlow's), the CLI, Hugging Face import/export,
downloading. The TF fixture is tf_fixtures'."""
import http.server
import io
import json
import os
import re
import threading

import numpy as np
import pytest
import torch
import transformers

import convert
import parallel
from convert import hf_to_igpt, igpt_to_hf, main, tf_to_igpt
from igpt import IGPT, IGPTConfig, save_checkpoint
from tf_checkpoint import TFCheckpoint
from tf_fixtures import BERT_GOLDEN, BERT_PREFIX, GOLDEN, PREFIX
from tiny import TINY, tiny_model, tokens
from traps import CreatesAFile


def close(actual, expected):
    """Equal to 1e-5 relative to the largest magnitude."""
    expected = torch.as_tensor(expected)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


# ---- the original -> igpt ----

def test_converted_logits_match_tensorflow():
    model = tf_to_igpt(TFCheckpoint(PREFIX))
    assert model.config == IGPTConfig(n_px=5, n_vocab=16, n_embd=16, n_head=2, n_layer=2, n_classes=3)
    x = torch.from_numpy(GOLDEN["tokens"])
    with torch.no_grad():
        close(model(x)[0], GOLDEN["logits"])
        close(model.classify(x)[0], GOLDEN["clf_logits"])


def test_a_converted_bert_checkpoint_matches_tensorflows_logits_and_loss(tmp_path, capsys):
    out = tmp_path / "bert.pt"
    main([str(BERT_PREFIX), "--out", str(out)])
    assert "model/sos is absent: a BERT model" in capsys.readouterr().err
    model = IGPT.from_checkpoint(out)
    assert model.config == IGPTConfig(n_px=5, n_vocab=16, n_embd=16, n_head=2, n_layer=2, bert=True)
    x, mask = torch.from_numpy(BERT_GOLDEN["tokens"]), torch.from_numpy(BERT_GOLDEN["mask"])
    with torch.no_grad():
        logits, loss = model(x, mask=mask)
    close(logits, BERT_GOLDEN["logits"])
    assert loss.item() == pytest.approx(BERT_GOLDEN["loss"].item(), abs=1e-5)


def test_only_the_model_variables_are_read(monkeypatch):
    read = []
    original = TFCheckpoint.read
    monkeypatch.setattr(TFCheckpoint, "read", lambda self, name: read.append(name) or original(self, name))
    tf_to_igpt(TFCheckpoint(PREFIX), verbose=False)
    per_layer = ["ln_1/g", "ln_2/g", "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/c_proj", "mlp/c_fc/w",
                 "mlp/c_proj/w"]
    expected = ["model/" + n for n in ("wte", "wpe", "sos", "wtet", "ln_f/g", "clf/wclf")]
    expected += [f"model/h{i}/{n}" for i in range(2) for n in per_layer]
    assert sorted(read) == sorted(expected)


def test_a_missing_or_misshaped_model_tensor_is_named():
    ckpt = TFCheckpoint(PREFIX)
    del ckpt.entries["model/h1/mlp/c_fc/w"]
    with pytest.raises(KeyError, match="model/h1/mlp/c_fc/w"):
        tf_to_igpt(ckpt)
    ckpt = TFCheckpoint(PREFIX)
    ckpt.entries["model/h1/attn/v_proj"] = ckpt.entries["model/h1/attn/v_proj"]._replace(shape=(2, 16, 8))
    with pytest.raises(ValueError, match=r"'model/h1/attn/v_proj' .* shape \(2, 16, 8\), expected \(2, 8, 16\)"):
        tf_to_igpt(ckpt)


def test_cli_writes_a_checkpoint_with_the_palette_and_will_not_overwrite(tmp_path, capsys):
    palette = np.random.default_rng(0).uniform(-1, 1, (16, 3))
    np.save(tmp_path / "palette.npy", palette)
    out = tmp_path / "igpt.pt"
    main([str(PREFIX), "--out", str(out), "--palette", str(tmp_path / "palette.npy")])
    assert "read 22/22 tensors" in capsys.readouterr().err
    model = IGPT.from_checkpoint(out)
    torch.testing.assert_close(model.palette, torch.from_numpy(palette).float())
    with torch.no_grad():
        close(model(torch.from_numpy(GOLDEN["tokens"]))[0], GOLDEN["logits"])
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="--force"):
        main([str(PREFIX), "--out", str(out)])
    assert out.read_bytes() == before
    main([str(PREFIX), "--out", str(out), "--force"])
    assert IGPT.from_checkpoint(out).palette is None
    np.save(tmp_path / "palette.npy", palette[:8])
    with pytest.raises(SystemExit, match="8 colours but the model has n_vocab=16"):
        main([str(PREFIX), "--out", str(out), "--force", "--palette", str(tmp_path / "palette.npy")])


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of"),
    ([str(PREFIX), "--hf", "x"], "give exactly one of"),
    ([str(PREFIX)], "--out is required"),
    ([str(PREFIX), "--out", "x.pt", "--palette"], "--palette needs a path"),
    ([str(PREFIX), "--out", "x.pt", "--bert"], "--bert picks the model --download fetches"),
])
def test_cli_argument_errors_name_the_fix(args, message, capsys):
    with pytest.raises(SystemExit):
        main(args)
    assert message in capsys.readouterr().err


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    # one entry an option, read below "options:" (the description above names several options too)
    defaults = {}
    for entry in re.split(r"\n  (?=-)", text[text.index("options:"):])[1:]:
        entry = " ".join(entry.split())
        if not entry.startswith("-h"):
            defaults[entry.split()[0]] = re.search(r"\(default: (.*)\)$", entry)[1]
    assert set(defaults) == {"--out", "--palette", "--force", "--download", "--bert", "--step", "--dir", "--dataset",
                             "--base_url", "--hf", "--to_hf", "--ckpt", "--from_dcp"}
    assert defaults["--step"] == "1000000" and defaults["--base_url"] == convert.BASE_URL
    assert defaults["--dir"] == "release"


# ---- Hugging Face ----

# Heads of 16 so that sqrt(head_dim) is whole: transformers 5.17's ImageGPT truncates its attention scale to an int.
HF_TINY = {**TINY, "n_head": 2}


def hf_model(seed=0, **config):
    """A tiny ImageGPTForCausalImageModeling with random weights everywhere and zero biases."""
    config = transformers.ImageGPTConfig(vocab_size=17, n_positions=16, n_embd=32, n_layer=2, n_head=2, **config)
    model = transformers.ImageGPTForCausalImageModeling(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.zeros(p.shape) if name.endswith(".bias") else torch.randn(p.shape, generator=g) * 0.3
                    + ("ln_" in name))  # gains around 1
    return model


def hf_logits(model, x):
    """HF starts each sequence with the SOS token id vocab_size - 1 and predicts x_i at position i."""
    sos = torch.full((x.size(0), 1), model.config.vocab_size - 1)
    with torch.no_grad():
        return model(torch.cat([sos, x[:, :-1]], dim=1)).logits


def test_hf_import_matches_hf_logits(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "igpt.pt")])
    model = IGPT.from_checkpoint(tmp_path / "igpt.pt")
    assert model.config == IGPTConfig(**HF_TINY)
    x = tokens()
    with torch.no_grad():
        close(model(x)[0], hf_logits(hf, x))


def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path):
    model = tiny_model(n_head=2)
    save_checkpoint(tmp_path / "igpt.pt", model)
    main(["--to_hf", "--ckpt", str(tmp_path / "igpt.pt"), "--out", str(tmp_path / "hf")])
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf").eval()
    x = tokens()
    with torch.no_grad():
        close(hf_logits(hf, x), model(x)[0])
    with pytest.raises(FileExistsError, match="--force"):
        igpt_to_hf(model, tmp_path / "hf")
    torch.testing.assert_close(hf_to_igpt(tmp_path / "hf").state_dict(), model.state_dict())  # round trip


def test_hf_export_overwrites_none_of_its_files_without_force(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"config\.json exists; pass --force"):
        igpt_to_hf(tiny_model(), tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json"]
    igpt_to_hf(tiny_model(), tmp_path / "hf", force=True)
    assert (tmp_path / "hf" / "config.json").read_text() != "{}"


def test_an_hf_export_cut_short_leaves_no_half_written_weights(tmp_path, monkeypatch):
    import safetensors.torch

    def cut_short(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", cut_short)
    with pytest.raises(KeyboardInterrupt):
        igpt_to_hf(tiny_model(), tmp_path / "hf")
    assert os.listdir(tmp_path / "hf") == []


def test_hf_export_of_a_bert_model_is_refused(tmp_path):
    save_checkpoint(tmp_path / "bert.pt", tiny_model(bert=True))
    with pytest.raises(SystemExit, match="BERT model cannot be exported to Hugging Face"):
        main(["--to_hf", "--ckpt", str(tmp_path / "bert.pt"), "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_hf_export_keeps_the_palette_where_the_image_processor_reads_it(tmp_path):
    palette = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
    save_checkpoint(tmp_path / "igpt.pt", tiny_model(), palette=palette)
    main(["--to_hf", "--ckpt", str(tmp_path / "igpt.pt"), "--out", str(tmp_path / "hf")])
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    np.testing.assert_array_equal(np.asarray(processor.clusters, np.float32), palette)
    main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pt")])
    torch.testing.assert_close(IGPT.from_checkpoint(tmp_path / "back.pt").palette, torch.from_numpy(palette))


def test_hf_export_over_an_earlier_one_leaves_no_palette_the_model_does_not_have(tmp_path):
    palette = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
    save_checkpoint(tmp_path / "with.pt", tiny_model(), palette=palette)
    save_checkpoint(tmp_path / "without.pt", tiny_model(seed=1))
    main(["--to_hf", "--ckpt", str(tmp_path / "with.pt"), "--out", str(tmp_path / "hf")])
    main(["--to_hf", "--ckpt", str(tmp_path / "without.pt"), "--out", str(tmp_path / "hf"), "--force"])
    assert not (tmp_path / "hf" / "preprocessor_config.json").exists()
    main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pt")])
    assert IGPT.from_checkpoint(tmp_path / "back.pt").palette is None


def test_hf_export_refuses_a_palette_of_another_size_than_the_vocabulary(tmp_path):
    with pytest.raises(ValueError, match="the palette has 8 colours but the model has n_vocab=16"):
        igpt_to_hf(tiny_model(), tmp_path / "hf", palette=np.zeros((8, 3), np.float32))
    assert not (tmp_path / "hf").exists()  # refused before anything is written


def test_without_transformers_the_hf_commands_say_what_to_install(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "igpt.pt", tiny_model())
    real_import = convert.importlib.import_module

    def no_transformers(name):
        if name.startswith(("transformers", "safetensors")):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name)

    monkeypatch.setattr(convert.importlib, "import_module", no_transformers)
    with pytest.raises(SystemExit, match="convert.py: Hugging Face interop needs transformers: pip install "
                                         "transformers$"):
        main(["--to_hf", "--ckpt", str(tmp_path / "igpt.pt"), "--out", str(tmp_path / "hf")])


def test_hf_pytorch_model_bin_with_old_mask_buffers_is_read(tmp_path):
    """Older transformers saved pytorch_model.bin, holding each layer's causal mask as attn.bias/masked_bias."""
    hf = hf_model(seed=1)
    state = hf.state_dict()
    for i in range(2):
        state[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 16, 16).tril()
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hf.config.save_pretrained(tmp_path / "hf")
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    x = tokens()
    with torch.no_grad():
        close(hf_to_igpt(tmp_path / "hf")(x)[0], hf_logits(hf, x))


def test_a_non_zero_hf_bias_is_named(tmp_path):
    hf = hf_model()
    with torch.no_grad():
        hf.transformer.h[1].mlp.c_fc.bias[3] = 0.5
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.bias .* non-zero"):
        hf_to_igpt(tmp_path / "hf")


@pytest.mark.parametrize("name, write", [
    ("pytorch_model.bin", lambda path: path.write_bytes(np.random.default_rng(0).bytes(3000))),  # damaged
    ("pytorch_model.bin", lambda path: torch.save({"wte.weight": CreatesAFile(str(path.parent / "hacked"))}, path)),
    ("pytorch_model.bin", lambda path: torch.save([torch.zeros(2)], path)),  # tensors, but not by name
    ("model.safetensors", lambda path: path.write_bytes(np.random.default_rng(0).bytes(3000))),
], ids=["damaged", "crafted", "unnamed", "damaged_safetensors"])
def test_hf_weights_that_cannot_be_read_safely_are_refused_in_one_line(tmp_path, name, write):
    hf_model().config.save_pretrained(tmp_path / "hf")
    write(tmp_path / "hf" / name)
    with pytest.raises(SystemExit, match=rf"^convert.py: '.*{name}' cannot be read safely as the model's weights: "
                                         r".*; download the model again$") as e:
        main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "igpt.pt")])
    assert "weights_only" not in str(e.value)
    assert not (tmp_path / "hf" / "hacked").exists()  # the pickle that would have created it was never run


def test_an_hf_config_lacking_a_key_names_it(tmp_path):
    hf_model().save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "n_positions"}))
    with pytest.raises(SystemExit, match=r"^convert.py: .*config.json lacks n_positions: give the config.json that "
                                         "save_pretrained wrote with the weights$"):
        main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "igpt.pt")])


def test_an_hf_config_that_is_not_a_json_object_is_refused_naming_it(tmp_path):
    hf_model().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match=r"^convert.py: .*config.json holds a JSON list, not an object: give the "
                                         "file save_pretrained wrote$"):
        main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "igpt.pt")])


def test_an_hf_model_igpt_cannot_express_is_refused(tmp_path):
    hf_model(activation_function="gelu_new").save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="activation_function='gelu_new'"):
        hf_to_igpt(tmp_path / "hf")


# ---- sharded checkpoints (train.py --fsdp) -> one file ----

def test_from_dcp_makes_a_sharded_checkpoint_the_single_file_the_scripts_read(tmp_path):
    model, palette = tiny_model(), torch.rand(16, 3) * 2 - 1
    parallel.save_sharded(str(tmp_path / "ckpt.dcp"), model, model.configure_optimizers(1e-3), palette=palette,
                          step=3)
    main(["--from_dcp", str(tmp_path / "ckpt.dcp"), "--out", str(tmp_path / "model.pt")])
    loaded = IGPT.from_checkpoint(tmp_path / "model.pt")
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(loaded.palette, palette)


def test_a_sharded_checkpoint_given_for_a_file_names_the_command_that_makes_one(tmp_path):
    model = tiny_model()
    parallel.save_sharded(str(tmp_path / "ckpt.dcp"), model, model.configure_optimizers(1e-3))
    with pytest.raises(ValueError, match=r"sharded checkpoint .*: python convert.py --from_dcp .*ckpt.dcp --out"):
        IGPT.from_checkpoint(tmp_path / "ckpt.dcp")


# ---- downloading ----

class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `files` (URL path -> bytes), honouring "Range: bytes=N-", and logs (path, Range header) pairs."""
    files, requests = {}, []

    def do_GET(self):
        self.requests.append((self.path, self.headers.get("Range")))
        if self.path not in self.files:
            self.send_error(404)
            return
        data = self.files[self.path]
        start = int(self.headers["Range"].removeprefix("bytes=").removesuffix("-")) if self.headers["Range"] else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RangeHandler.files, RangeHandler.requests = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", RangeHandler
    httpd.shutdown()
    httpd.server_close()


def npy_bytes(a):
    f = io.BytesIO()
    np.save(f, a)
    return f.getvalue()


def test_download_resumes_skips_complete_files_then_converts(tmp_path, server, capsys):
    url, handler = server
    for f in PREFIX.parent.iterdir():
        handler.files[f"/checkpoints/igpt-s/1000000/{f.name}"] = f.read_bytes()
    palette = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
    handler.files["/color-clusters/kmeans_centers.npy"] = npy_bytes(palette)
    for split in convert.DATASET_FILES:
        handler.files[f"/datasets/cifar10_{split}.npy"] = npy_bytes(np.arange(6) + len(split))
    folder = tmp_path / "release"
    (folder / "igpt-s").mkdir(parents=True)
    shard = "model.ckpt-1000000.data-00001-of-00003"
    full = handler.files[f"/checkpoints/igpt-s/1000000/{shard}"]
    (folder / "igpt-s" / (shard + ".part")).write_bytes(full[:1000])  # left by an interrupted run
    (folder / "cifar10_teY.npy").write_bytes(handler.files["/datasets/cifar10_teY.npy"])  # already complete

    main(["--download", "s", "--dir", str(folder), "--palette", "--dataset", "cifar10", "--base_url", url])
    assert (f"/checkpoints/igpt-s/1000000/{shard}", "bytes=1000-") in handler.requests
    assert "/datasets/cifar10_teY.npy" not in [path for path, _ in handler.requests]
    assert "MB/s" in capsys.readouterr().err
    for path, data in handler.files.items():  # the checkpoint's files in a folder of its own, the rest beside it
        assert (folder / ("igpt-s" if "/checkpoints/" in path else "") / path.rsplit("/", 1)[1]).read_bytes() == data
    assert not list(folder.glob("**/*.part"))
    model = IGPT.from_checkpoint(folder / "igpt-s-1000000.pt")
    torch.testing.assert_close(model.palette, torch.from_numpy(palette))
    with torch.no_grad():
        close(model(torch.from_numpy(GOLDEN["tokens"]))[0], GOLDEN["logits"])


def test_download_failure_names_the_url(tmp_path, server):
    url, _ = server
    with pytest.raises(SystemExit, match=f"{url}/checkpoints/igpt-m/131000/model.ckpt-131000.index: HTTP 404"):
        main(["--download", "m", "--step", "131000", "--dir", str(tmp_path), "--base_url", url])
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_each_size_downloads_into_a_folder_of_its_own_so_none_is_taken_for_another(tmp_path, server):
    url, handler = server
    for size in ("s", "m"):  # the same tiny files behind both names: what counts is that each is fetched
        for f in PREFIX.parent.iterdir():
            handler.files[f"/checkpoints/igpt-{size}/1000000/{f.name}"] = f.read_bytes()
    for size in ("s", "m"):
        main(["--download", size, "--dir", str(tmp_path), "--base_url", url])
    assert {path for path, _ in handler.requests} == set(handler.files)  # m's files too, none skipped as s's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["igpt-m", "igpt-m-1000000.pt", "igpt-s",
                                                          "igpt-s-1000000.pt"]


def test_download_bert_fetches_the_bert_release_into_a_folder_of_its_own(tmp_path, server):
    url, handler = server
    for f in BERT_PREFIX.parent.iterdir():
        handler.files[f"/checkpoints/igpt-s-bert/131000/{f.name.replace('1000000', '131000')}"] = f.read_bytes()
    folder = tmp_path / "release"
    folder.mkdir()
    for f in PREFIX.parent.iterdir():  # the autoregressive model's files, named as the BERT model's are
        (folder / f.name.replace("1000000", "131000")).write_bytes(f.read_bytes())
    main(["--download", "s", "--bert", "--step", "131000", "--dir", str(folder), "--base_url", url])
    assert {path for path, _ in handler.requests} == set(handler.files)
    model = IGPT.from_checkpoint(folder / "igpt-s-bert-131000.pt")
    assert model.config.bert
    x, mask = torch.from_numpy(BERT_GOLDEN["tokens"]), torch.from_numpy(BERT_GOLDEN["mask"])
    with torch.no_grad():
        close(model(x, mask=mask)[0], BERT_GOLDEN["logits"])
