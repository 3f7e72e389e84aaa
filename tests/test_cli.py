"""The command-line conventions every script shares (common.py): one spelling, defaults in --help, the same
--device and --compile, clear errors for a device that is not there; and every mistake a user makes with a flag or a
file, through the real command lines, ending in one line that names the fix."""
import importlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import common
import tf_fixtures
import train
from fake_cifar import write_cifar10
from igpt import IGPT, save_checkpoint
from traps import CreatesAFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPTS = ["quantize", "train", "sample", "probe", "convert", "pipeline", "demo"]


def parser_of(name, monkeypatch, capsys):
    """The parser a script builds, and its --help text."""
    module = importlib.import_module(name)
    built = []
    monkeypatch.setattr(module, "argument_parser", lambda doc: built.append(common.argument_parser(doc)) or built[-1])
    with pytest.raises(SystemExit):
        module.main(["--help"])
    return built[0], capsys.readouterr().out


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_explains_every_option_and_gives_its_default(name, monkeypatch, capsys):
    parser, text = parser_of(name, monkeypatch, capsys)
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])  # one entry an option, its help below it
    for action in parser._actions:
        if action.dest == "help" or not action.option_strings:
            continue
        entry = [e for e in entries if re.match(re.escape(action.option_strings[0]) + r"[\s,]", e)]
        assert entry, f"{name}.py --help does not list {action.option_strings[0]}"
        assert action.help and not action.help.lstrip().startswith("(default"), f"{action.dest} has no help text"
        if not action.required:
            assert "(default:" in " ".join(entry[0].split()), f"{name}.py --help gives no default for {action.dest}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_options_are_spelled_with_underscores_and_devices_chosen_alike(name, monkeypatch, capsys):
    parser, _ = parser_of(name, monkeypatch, capsys)
    defaults = {f.name: f.default for f in train.fields(train.TrainConfig)} if name == "train" else {}
    for action in parser._actions:
        if not action.option_strings:
            continue
        assert "-" not in action.option_strings[0].lstrip("-"), action.option_strings[0]
        default = defaults.get(action.dest, action.default)  # train's parser takes its defaults from TrainConfig
        if action.dest == "device":
            assert default == "auto"
        if action.dest in ("compile", "fast"):
            assert tuple(action.choices) == common.SWITCH and default == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:3"])
def test_a_gpu_that_is_not_there_names_what_to_pass(name):
    with pytest.raises(ValueError, match=f"^--device {name}: PyTorch sees no GPU here; use --device cpu "
                                         r"\(or auto\)$"):
        common.resolve_device(name)


def test_a_name_that_is_no_device_names_the_choices():
    with pytest.raises(ValueError, match="^--device 'gpu' is not a device: use auto, cpu, cuda or cuda:N$"):
        common.resolve_device("gpu")


def test_auto_and_cpu_resolve_and_switches_mean_on_for_a_gpu():
    assert common.resolve_device("cpu") == torch.device("cpu")
    assert common.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert common.switch("auto", "cuda") and not common.switch("auto", "cpu") and common.switch("on", "cpu")
    with pytest.raises(ValueError, match="auto, on, off"):
        common.switch("yes", "cpu")


# ---- mistakes with flags and files: one line, never a traceback ----

def mistakes(t):
    """(command line, what its one line must say) for the mistakes a user makes, on files made under t."""
    from test_train import write_tokens  # tiny token files with their palette
    toy = write_tokens(t)
    os.makedirs(t / "other")
    other = write_tokens(t / "other", seed=1)
    os.makedirs(t / "empty")
    empty = write_tokens(t / "empty")
    np.save(f"{empty}_vaX.npy", np.zeros((0, 16), np.uint16))
    train.main(["--data", toy, "--out", str(t / "run"), "--n_layer", "1", "--n_embd", "16", "--n_head", "2",
                "--batch_size", "8", "--max_steps", "1", "--threads", "1"])
    ckpt = str(t / "run" / "ckpt.pt")
    (t / "random.bin").write_bytes(np.random.default_rng(0).bytes(3000))
    flipped = bytearray(open(ckpt, "rb").read())
    flipped[len(flipped) // 2] ^= 4
    (t / "flipped.pt").write_bytes(flipped)
    model = IGPT.from_checkpoint(ckpt)
    state = {k: v for k, v in model.state_dict().items() if k != "ln_f.g"}
    save_checkpoint(t / "misfit.pt", SimpleNamespace(config=model.config, state_dict=lambda: state))
    write_cifar10(t / "c10")
    whole = (t / "c10" / "data_batch_2").read_bytes()
    (t / "c10" / "data_batch_2").write_bytes(whole[:len(whole) // 3])
    write_cifar10(t / "evil")
    with open(t / "evil" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": CreatesAFile(str(t / "hacked")), b"labels": [0]}, f)
    shutil.copytree(tf_fixtures.PREFIX.parent, t / "tf")
    shard = t / "tf" / (tf_fixtures.PREFIX.name + ".data-00001-of-00003")
    damaged = bytearray(shard.read_bytes())
    damaged[100] ^= 1
    shard.write_bytes(damaged)
    os.makedirs(t / "pipe")
    (t / "pipe" / "summary.json").write_text("{not json")
    for split in ("train", "test"):
        os.makedirs(t / "splits" / split / "cat")
        Image.new("RGB", (4, 4)).save(t / "splits" / split / "cat" / "a.png")
    no_gpu = [] if torch.cuda.is_available() else [
        (["sample.py", "--ckpt", ckpt, "--device", "cuda"], "use --device cpu")]
    return no_gpu + [
        (["train.py", "--data", str(t / "none"), "--out", str(t / "o1")], "make it with: python quantize.py"),
        (["train.py", "--data", f"{toy}_trX.npy", "--out", str(t / "o2")], "give the prefix of the files instead"),
        (["sample.py", "--ckpt", f"{toy}_trX.npy"], "is not an igpt checkpoint"),
        (["train.py", "--data", toy, "--init_from", str(t / "random.bin"), "--out", str(t / "o3")],
         "is not an igpt checkpoint"),
        (["sample.py", "--ckpt", str(t / "flipped.pt")], "use another copy"),
        (["sample.py", "--ckpt", str(t / "misfit.pt")], "do not fit the model of its config: missing ['ln_f.g']"),
        (["train.py", "--resume", "--out", str(t / "run"), "--n_layer", "3"], "drop the flag"),
        (["train.py", "--resume", "--out", str(t / "run"), "--data", other], "drop the flag"),
        (["train.py", "--data", toy, "--device", "gpu", "--out", str(t / "o4")], "use auto, cpu, cuda or cuda:N"),
        (["train.py", "--dtype", "float16"], "invalid choice: 'float16'"),
        (["train.py", "--eval_split", "test"], "invalid choice: 'test'"),
        (["sample.py", "--ckpt", ckpt, "--compile", "yes"], "invalid choice: 'yes'"),
        (["sample.py", "--ckpt", ckpt, "--top_k", "-1"], "--top_k must be at least 0"),
        (["train.py", "--data", toy, "--n_embd", "100", "--n_head", "8", "--out", str(t / "o5")],
         "pick n_embd a multiple of n_head"),
        (["train.py", "--data", other, "--ckpt", ckpt, "--clf", "--out", str(t / "o6")],
         "quantize the images with the model's palette"),
        (["convert.py", "--hf", str(t / "nothing"), "--out", str(t / "c1.pt")], "no Hugging Face model folder"),
        (["convert.py", ckpt, "--out", str(t / "c2.pt")], "a checkpoint of ours already"),
        (["convert.py", str(t / "tf" / tf_fixtures.PREFIX.name), "--out", str(t / "c3.pt")], "download it again"),
        (["convert.py", str(tf_fixtures.PREFIX), "--out", ckpt], "pass --force"),
        (["quantize.py", str(t / "c10"), "--out", str(t / "q1")], "fetch the official archive again"),
        (["quantize.py", str(t / "evil"), "--out", str(t / "q2")], "is not a readable CIFAR file (it asks for"),
        (["quantize.py", str(t / "splits"), "--out", str(t / "q3")], f"{t / 'splits'}:train --test"),
        (["pipeline.py", "--out", str(t / "pipe"), "--stages", "sample"], "move it away"),
        (["probe.py", "--ckpt", ckpt, "--data", toy, "--out", str(t / "run"), "--layers", "9"],
         "this model's layers are 1..1"),
        (["probe.py", "--ckpt", ckpt, "--data", empty, "--out", str(t / "p1")], "holds no images"),
    ]


def test_every_mistake_ends_in_one_line_that_names_the_fix(tmp_path):
    cases = mistakes(tmp_path)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "run_clis.py")], capture_output=True,
                            text=True, input=json.dumps([argv for argv, _ in cases]), timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    wrong = [f"python3 {' '.join(argv)} (exit {status}, expected one line with {fix!r}):\n{err}"
             for (argv, fix), (status, err) in zip(cases, json.loads(result.stdout))
             if status not in (1, 2) or "Traceback" in err or "weights_only" in err
             or len(err.strip().splitlines()) != 1 or fix not in err]
    assert not wrong, "\n".join(wrong)  # every case that went wrong, not only the first
    assert not os.path.exists(tmp_path / "hacked")  # the pickle that would have created it was never run
