"""The command line as a table: options from config fields, `--config` everywhere, a fast --help,
and the import rules between the rooms."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from cli import app
from cli_options import config_params, field_help
from demo.config import QUICK, DemoConfig
from pipeline.encode_config import EncodeConfig
from sampler.config import SampleConfig, SolveConfig
from trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
COMMANDS = [
    ["inspect"],
    ["validate"],
    ["encode"],
    ["download"],
    ["train"],
    ["sample"],
    ["demo"],
    ["demo-tools", "data"],
    ["demo-tools", "train-vae"],
    ["demo-tools", "train-classifier"],
]
LONG_RUNNING = ["encode", "download", "train", "sample", "demo"]
ROOMS = (
    "foundation",
    "latent_store",
    "pipeline",
    "trainer",
    "sampler",
    "evaluation",
    "demo",
    "testkit",
)
# what each room may import from the project (the ground floor is always allowed)
ALLOWED = {
    "foundation": set(),
    "latent_store": set(),
    "pipeline": {"latent_store"},
    "trainer": {"latent_store"},
    "sampler": {"latent_store", "trainer"},
    "evaluation": {"latent_store", "trainer", "sampler"},
    "demo": {"latent_store", "pipeline", "trainer", "sampler", "evaluation"},
    "testkit": {"latent_store", "trainer"},
}


def _imported_modules(args: list[str]) -> set[str]:
    """Modules that `python -X importtime cli.py ARGS` imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "cli.py"), *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}


@pytest.mark.parametrize("args", [[], *COMMANDS], ids=lambda a: " ".join(a) or "app")
def test_help_imports_neither_torch_nor_diffusers(args):
    mods = _imported_modules([*args, "--help"])
    heavy = sorted(m for m in mods if m.split(".")[0] in ("torch", "diffusers", "zarr"))
    assert not heavy, f"`latentdit {' '.join(args)} --help` imported {heavy[:5]}"


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_every_option_has_complete_help(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    lines = [line.rstrip() for line in result.output.splitlines()]
    assert not [line for line in lines if line.endswith(" .")], "a help text was cut off"
    command = app if args[0] != "demo-tools" else cli.demo_tools
    info = next(c for c in command.registered_commands if c.name == args[-1])
    params = info.callback.__signature__.parameters.values()
    for p in params:
        assert p.default.help, f"{args}: {p.name} has no help"


def test_options_take_default_and_help_from_the_config_field():
    params = {p.name: p for p in config_params(TrainConfig)}
    steps = next(f for f in dataclasses.fields(TrainConfig) if f.name == "steps")
    info = params["steps"].parameter.default
    assert field_help(TrainConfig, steps) in info.help and "[default: 400000]" in info.help
    assert "[required]" in params["store"].parameter.default.help
    # attribute docstrings are help too; nested configs are flattened into the command
    sample = {p.name: p for p in config_params(SampleConfig)}
    assert sample["steps"].path == ("solve", "steps")
    assert "Solver steps" in sample["steps"].parameter.default.help
    assert "[default: 50]" in sample["steps"].parameter.default.help
    assert SolveConfig().steps == 50
    encode = {p.name: p for p in config_params(EncodeConfig)}
    assert "command" not in encode  # filled in by the command itself
    assert "[default: 256]" in encode["image_size"].parameter.default.help


def test_required_options_are_one_line_errors():
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: latentdit train: missing --store, --run (give it, or put it in --config)"
    )


@pytest.mark.parametrize("command", LONG_RUNNING)
def test_every_long_running_command_reads_config_files(tmp_path, command):
    bad = tmp_path / "options.yaml"
    bad.write_text("no_such_option: 1\n")
    result = runner.invoke(app, [command, *_required_args(command, tmp_path), "--config", str(bad)])
    assert result.exit_code == 2, result.output
    assert f"unknown options ['no_such_option']; see `latentdit {command} --help`" in result.output


def _required_args(command: str, tmp_path: Path) -> list[str]:
    urls = tmp_path / "urls.csv"
    urls.write_text("url,label\n")
    return {
        "encode": [str(tmp_path)],
        "download": [str(urls)],
        "sample": [str(tmp_path)],
    }.get(command, [])


def test_config_file_fills_options_and_the_command_line_wins(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("demo.run.run_demo", lambda cfg, echo: seen.setdefault("cfg", cfg))
    options = tmp_path / "demo.toml"
    options.write_text('train_steps = 7\nlr = 0.5\nout = "from-file"\n')
    result = runner.invoke(app, ["demo", "--config", str(options), "--lr", "0.25"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.train_steps, cfg.lr, cfg.out) == (7, 0.25, Path("from-file"))
    assert cfg.batch_size == DemoConfig().batch_size
    seen.clear()
    result = runner.invoke(app, ["demo", "--quick", "--train-steps", "3"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].train_steps == 3  # the command line wins over the preset
    assert seen["cfg"].train_per_class == QUICK["train_per_class"] != DemoConfig().train_per_class


def _project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & {*ROOMS, "cli", "evaluation"}


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_imports_only_downward(room):
    allowed = ALLOWED[room] | {room, "foundation"}
    for path in sorted((ROOT / room).rglob("*.py")):
        wrong = _project_imports(path) - allowed
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_the_dit_does_not_import_zarr():
    code = "import sys, trainer.model; print('zarr' in sys.modules, 'latent_store' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.split() == ["False", "False"]


def test_no_source_file_over_400_lines():
    files = [
        p for room in (*ROOMS, "evaluation", "bench", "tests") for p in (ROOT / room).rglob("*.py")
    ]
    long = {
        str(p.relative_to(ROOT)): n
        for p in [*files, *ROOT.glob("*.py")]
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, f"files over 400 lines: {long}"


def test_cli_is_a_thin_table():
    assert len(Path(cli.__file__).read_text().splitlines()) <= 400
