"""The command-line conventions every script shares (common.py): one spelling, defaults in --help, the same
--device and --compile, clear errors for a device that is not there."""
import importlib
import re

import pytest
import torch

import common
import train

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
def test_help_lists_every_option_with_its_default(name, monkeypatch, capsys):
    parser, text = parser_of(name, monkeypatch, capsys)
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])  # one entry an option, its help below it
    for action in parser._actions:
        if action.dest == "help" or not action.option_strings:
            continue
        entry = [e for e in entries if re.match(re.escape(action.option_strings[0]) + r"[\s,]", e)]
        assert entry, f"{name}.py --help does not list {action.option_strings[0]}"
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
@pytest.mark.parametrize("name", ["cuda", "gpu", "cuda:3"])
def test_a_device_that_is_not_there_names_what_to_pass(name):
    with pytest.raises(ValueError, match="--device cpu|use auto, cpu, cuda or cuda:N"):
        common.resolve_device(name)


def test_auto_and_cpu_resolve_and_switches_mean_on_for_a_gpu():
    assert common.resolve_device("cpu") == torch.device("cpu")
    assert common.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert common.switch("auto", "cuda") and not common.switch("auto", "cpu") and common.switch("on", "cpu")
    with pytest.raises(ValueError, match="auto, on, off"):
        common.switch("yes", "cpu")
