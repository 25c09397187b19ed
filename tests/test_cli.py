"""The command line: declared arguments, help, version, dry runs, key listings, recipe kinds, and
one-line argument errors that answer without importing torch."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

import maect
from maect import cli
from maect.cli import COMMANDS, Arg, Invocation, command, main
from maect.config import RunConfig, field_help, load_config
from maect.evaluation.config import EvalConfig
from tests.conftest import TINY_OVERRIDES


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_command_with_its_summary(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    for name, cmd in COMMANDS.items():
        assert f"  {name}" in out and cmd.summary in out
    assert "`maect COMMAND --help`" in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_help_shows_its_arguments_and_examples(capsys, name):
    code, out, _ = _run(capsys, name, "--help")
    assert code == 0
    cmd = COMMANDS[name]
    assert out.startswith(f"usage: {cmd.usage()}")
    for arg in cmd.args:
        assert arg.usage().strip("[]") in out and arg.help in out
    assert "examples:" in out and all(example in out for example in cmd.examples)
    assert ("--dry-run" in out) == cmd.dry_run


def test_version(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.strip() == f"maect {maect.__version__}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "maect: error: missing COMMAND, one of: pretrain, tune"),
        (["pretrian"], "maect: error: unknown command 'pretrian'; did you mean 'pretrain'?"),
        (
            ["pretrain", "recipe=mae/fmnist_vit_t"],
            "maect pretrain: error: missing out=DIR (the run directory: config.yaml",
        ),
        (
            ["pretrain", "recipe=a", "out=b", "--frobnicate"],
            "maect pretrain: error: unrecognized arguments: --frobnicate "
            "(see maect pretrain --help)",
        ),
        (["pretrain", "recipe=a", "out=b", "out=c"], "maect pretrain: error: out= is given twice"),
        (
            ["pretrain", "recipe=a", "out="],
            "maect pretrain: error: out= is empty (out=DIR: the run",
        ),
        (
            ["pretrain", "recipe=a", "out=b", "epochs"],
            "maect pretrain: error: argument 'epochs' is not of the form",
        ),
        (["evaluate"], "maect evaluate: error: missing SOURCE (a run directory, a checkpoint"),
        (["report", "runs/x", "out=y"], "maect report: error: unknown argument 'out=y'"),
        (["--dry-run", "pretrain"], "maect: error: unrecognized arguments: --dry-run"),
    ],
)
def test_argument_errors_are_one_line(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(message), err


HEAVY = ("torch", "timm", "lightning", "pytorch_lightning", "torchvision")
LIGHT_CALLS = [
    ["--help"],
    ["--version"],
    *([name, "--help"] for name in COMMANDS),
    ["pretrain"],
    ["pretrian"],
    ["pretrain", "recipe=mae/fmnist", "out=x"],  # unknown recipe: read from YAML only
    ["pretrain", "recipe=mae/fmnist_vit_t", "out=x", "trainer.epoch=3"],
    ["run", "recipe=mae/fmnist_vit_t"],
    ["recipes"],
    ["config", "mae/fmnist_vit_t"],
]


def test_help_version_and_argument_errors_do_not_import_torch():
    """Measured by which modules are loaded, in a fresh interpreter (never by time)."""
    script = (
        "import contextlib, io, json, sys\n"
        "from maect.cli import main\n"
        f"for argv in {LIGHT_CALLS!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        "        main(argv)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_dry_run_prints_the_config_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["pretrain", "recipe=mae/fmnist_vit_t", f"out={out}", *TINY_OVERRIDES, "--dry-run"]
    code, text, _ = _run(capsys, *argv)
    assert code == 0 and not out.exists()
    assert f"# out={out}: a new run" in text
    expected = load_config("mae/fmnist_vit_t", TINY_OVERRIDES).to_dict()
    assert yaml.safe_load(text) == expected


def test_dry_run_of_a_pipeline_lists_every_stage(capsys, tmp_path):
    code, text, _ = _run(
        capsys, "run", "recipe=pipelines/demo_fmnist", f"out={tmp_path / 'p'}", "--dry-run"
    )
    plan = yaml.safe_load(text)
    assert code == 0 and not (tmp_path / "p").exists()
    assert list(plan["stages"]) == ["mae", "maect", "can"]
    assert plan["stages"]["maect"]["config"]["maect"]["init"] == str(tmp_path / "p" / "mae")
    assert plan["stages"]["mae"]["plan"] == "a new run"
    assert plan["evaluate"]["settings"]["data"]["test_subset"] == 2000


def _dataclasses(cls: type) -> list[type]:
    hints = typing.get_type_hints(cls)
    nested = [
        hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])
    ]
    return [cls, *(c for n in nested for c in _dataclasses(n))]


@pytest.mark.parametrize(
    "cls", [*_dataclasses(RunConfig), *_dataclasses(EvalConfig)], ids=lambda c: c.__name__
)
def test_every_config_key_has_help(cls):
    """`maect config RECIPE` and `maect config evaluate` show each key's help from its section's
    docstring (Attributes:)."""
    helps = field_help(cls)
    assert [f.name for f in dataclasses.fields(cls) if not helps.get(f.name)] == []
    assert set(helps) <= {f.name for f in dataclasses.fields(cls)}


def test_config_lists_keys_values_and_help(capsys):
    code, text, _ = _run(capsys, "config", "maect/fmnist_vit_t", "trainer.epochs=3")
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == "# maect/fmnist_vit_t: method maect, trained by `maect tune`"
    assert any(
        line.startswith("trainer.epochs=3 ") and "raising it on a finished run" in line
        for line in lines
    )
    assert "# maect: MAE-CT contrastive tuning (Lehner et al. 2023)" in lines
    keys = [line.split("=", 1)[0] for line in lines if "=" in line and not line.startswith("#")]
    cfg = load_config("maect/fmnist_vit_t")
    flat = [
        f"{section}.{key}" if isinstance(values, dict) else section
        for section, values in cfg.to_dict().items()
        for key in (values if isinstance(values, dict) else [None])
    ]
    assert keys == flat  # every key, in config.yaml's order, and only the method's section
    assert "can.mask_ratio" not in keys


def test_config_lists_the_evaluation_keys(capsys):
    code, text, _ = _run(capsys, "config", "evaluate", "knn.k=5")
    assert code == 0
    assert "knn.k=5" in [line.split()[0] for line in text.splitlines() if line.strip()]
    assert "data.train_subset=null" in text


def test_recipes_lists_pipelines_and_filters(capsys):
    code, text, _ = _run(capsys, "recipes")
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()}
    assert code == 0
    assert rows["mae/fmnist_vit_t"][0] == "pretrain"
    assert rows["maect/fmnist_vit_t"][0] == "tune"
    assert rows["pipelines/demo_fmnist"][:2] == ["run", "pipeline:"]
    _, text, _ = _run(capsys, "recipes", "fmnist")
    assert all("fmnist" in line.split()[0] for line in text.splitlines())
    assert "pipelines/demo_fmnist" in text and "mae/in1k_vit_b16" not in text
    _, text, _ = _run(capsys, "recipes", "*vit_h1?")
    listed = {line.split()[0] for line in text.splitlines()}
    assert {"mae/in1k_vit_h14", "maect/in1k_vit_h16", "maectaug/in1k_vit_h14"} <= listed
    assert all(re.fullmatch(r".*vit_h1.", name) for name in listed)
    assert listed == {name for name in rows if re.fullmatch(r".*vit_h1.", name)}
    code, _, err = _run(capsys, "recipes", "imagenet22k")
    assert code == 2 and "no recipe matches 'imagenet22k'" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["pretrain", "recipe=pipelines/demo_fmnist", "out={tmp}"],
            "maect pretrain: error: pipelines/demo_fmnist is a pipeline, not a method recipe: "
            "run it with `maect run recipe=pipelines/demo_fmnist`",
        ),
        (
            ["tune", "recipe=pipelines/demo_fmnist", "init=x", "out={tmp}"],
            "maect tune: error: pipelines/demo_fmnist is a pipeline, not a method recipe",
        ),
        (
            ["run", "recipe=mae/fmnist_vit_t"],
            "maect run: error: mae/fmnist_vit_t is a method recipe, not a pipeline: train it "
            "with `maect pretrain recipe=mae/fmnist_vit_t out=DIR`",
        ),
        (
            ["run", "recipe=maect/fmnist_vit_t"],
            "train it with `maect tune recipe=maect/fmnist_vit_t init=MAE_RUN out=DIR`",
        ),
        (
            ["pretrain", "recipe=maect/fmnist_vit_t", "out={tmp}"],
            "maect pretrain: error: recipe maect/fmnist_vit_t (method maect) is not for maect "
            "pretrain: train it with `maect tune recipe=maect/fmnist_vit_t init=MAE_RUN out=DIR`",
        ),
        (
            ["tune", "recipe=can/fmnist_vit_t", "init=x", "out={tmp}"],
            "recipe can/fmnist_vit_t (method can) is not for maect tune: train it with "
            "`maect pretrain recipe=can/fmnist_vit_t out=DIR`",
        ),
        (
            ["run", "recipe=pipelines/demo_fmnst"],
            "maect run: error: unknown recipe 'pipelines/demo_fmnst'. Did you mean: "
            "pipelines/demo_fmnist",
        ),
        (["run", "recipe=demo"], "Did you mean: pipelines/demo_fmnist"),
        (["config", "pipelines/demo_fmnist"], "is a pipeline, not a method recipe"),
    ],
)
def test_a_recipe_given_to_the_wrong_command_says_so(capsys, tmp_path, argv, message):
    code, _, err = _run(capsys, *(a.format(tmp=tmp_path / "run") for a in argv))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert not (tmp_path / "run").exists()


def test_a_command_is_a_few_declarative_lines(capsys, monkeypatch):
    """How another module adds a command: the declaration gives parsing, help and errors."""
    monkeypatch.setattr(cli, "COMMANDS", dict(COMMANDS))
    seen: list[Invocation] = []

    @command(
        "shards",
        "Pack a dataset into shards.",
        Arg("data", "NAME", "dataset name"),
        Arg("out", "DIR", "output folder", required=False),
        overrides="any data.* key",
        examples=("maect shards data=imagefolder out=/tmp/s data.root=/data",),
        dry_run=True,
    )
    def cmd_shards(inv: Invocation) -> None:
        seen.append(inv)

    assert _run(capsys, "shards", "data=imagefolder", "data.root=/d", "--dry-run")[0] == 0
    assert seen[0].values == {"data": "imagefolder"} and seen[0].overrides == ["data.root=/d"]
    assert seen[0].dry_run
    _, out, _ = _run(capsys, "shards", "--help")
    assert "usage: maect shards data=NAME [out=DIR] [key=value ...] [--dry-run]" in out
    assert "shards    Pack a dataset into shards." in _run(capsys, "--help")[1]
    code, _, err = _run(capsys, "shards", "out=x")
    assert code == 2 and "missing data=NAME (dataset name)" in err


def _bad_recipe_files(tmp: Path) -> None:
    (tmp / "syntax.yaml").write_text("method: mae\ntrainer:\n  epochs: [1, 2\n  seed: 0\n")
    (tmp / "cycle.yaml").write_text(f"base: {tmp / 'cycle.yaml'}\n")
    (tmp / "a_file").write_text("not a directory")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["recipe={tmp}/syntax.yaml"],
            "error: {tmp}/syntax.yaml:4: invalid YAML: expected ',' or ']'",
        ),
        (
            ["data.crop_scale=[0.2,"],
            "error: override 'data.crop_scale=[0.2,': the value is not valid",
        ),
        (["recipe={tmp}/cycle.yaml"], "error: recipe base cycle: {tmp}/cycle.yaml -> {tmp}/cycle"),
        (["out={tmp}/a_file"], "error: out={tmp}/a_file is a file, not a directory"),
        (["out={tmp}/a_file/run"], "error: out={tmp}/a_file/run: {tmp}/a_file is a file, not a"),
        (["out=/proc/maect/run"], "error: out=/proc/maect/run is not writable (/proc: "),
        (
            ["trainer.accelerator=gpux"],
            "error: trainer.accelerator must be one of auto, gpu, cpu, cuda, mps, tpu, got "
            "'gpux'; did you mean 'gpu'?",
        ),
        (["trainer.accelerator=cuda"], "error: trainer.accelerator=cuda is not available on"),
        (["trainer.devices=two"], "error: trainer.devices='two' is not valid for cpu: "),
        (["trainer.devices=0"], "error: trainer.devices='0' is not valid for cpu"),
        (
            ["trainer.strategy=dpp"],
            "error: trainer.strategy 'dpp' is not a Lightning strategy; did",
        ),
        (
            ["trainer.strategy=deepspeed", "trainer.accelerator=cpu"],
            "error: Lightning refuses trainer.accelerator=cpu, trainer.devices=auto, "
            "trainer.strategy=deepspeed, trainer.num_nodes=1: To use the `DeepSpeedStrategy`, you "
            "must have DeepSpeed installed",
        ),
        (
            ["trainer.strategy=xla"],
            "error: Lightning refuses trainer.accelerator=auto, trainer.devices=auto, "
            "trainer.strategy=xla, trainer.num_nodes=1: Requirement 'torch_xla",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, args, message):
    if "/proc/" in args[0] and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    _bad_recipe_files(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    own = {a.split("=", 1)[0]: a for a in args if a.startswith(("recipe=", "out="))}
    argv = [
        "pretrain",
        own.get("recipe", "recipe=mae/fmnist_vit_t"),
        own.get("out", f"out={tmp_path / 'run'}"),
        *TINY_OVERRIDES,
        *(a for a in args if not a.startswith(("recipe=", "out="))),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(capsys, *argv)
    *_, line = err.strip().splitlines()  # log lines (e.g. a disabled monitor) may come first
    assert code == 2 and "Traceback" not in err, err
    assert line.startswith("maect pretrain: ") and message.format(tmp=tmp_path) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_fsdp_and_the_registered_strategies_stay_valid_names():
    from lightning.pytorch.strategies import StrategyRegistry

    from maect.engine import check_trainer

    for strategy in ("auto", "ddp", "fsdp", "ddp_find_unused_parameters_true", "DDP"):
        check_trainer(load_config("mae/fmnist_vit_t", [f"trainer.strategy={strategy}"]))
    assert "fsdp" in StrategyRegistry.available_strategies()
    for devices in ("auto", "1", "2"):
        check_trainer(load_config("mae/fmnist_vit_t", [f"trainer.devices={devices}"]))


# Lines of Lightning's notes and tips and of library warnings that a default run must not show.
NOISE = (
    "Tip:",
    "GPU available",
    "TPU available",
    "LeafSpec",
    "is smaller than the logging interval",
    "weights_only",
    "Loading `train_dataloader`",
    "`Trainer.fit` stopped",
    "Restoring states",
    "Restored all states",
    "Traceback",
)
QUIET_SCRIPT = """
import sys
from maect.cli import main
args = sys.argv[1:]
assert main([*args, "trainer.epochs=1"]) == 0
assert main([*args, "trainer.epochs=2"]) == 0  # extended: restores a checkpoint
print("=== verbose", file=sys.stderr, flush=True)
assert main([*args, "trainer.epochs=3", "--verbose"]) == 0
"""


def test_a_tiny_run_is_quiet_unless_verbose(tmp_path):
    args = [
        "pretrain",
        "recipe=mae/fmnist_vit_t",
        f"out={tmp_path / 'run'}",
        *TINY_OVERRIDES,
        "trainer.log_every_n_steps=50",  # more than the 4 steps of an epoch: Lightning warns
        "trainer.progress_bar=false",
        "trainer.recon_every=100",
    ]
    done = subprocess.run(
        [sys.executable, "-c", QUIET_SCRIPT, *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    quiet, verbose = done.stderr.split("=== verbose")
    assert [line for line in quiet.splitlines() if any(n in line for n in NOISE)] == []
    lines = quiet.strip().splitlines()
    assert lines and all(line.startswith("maect: ") for line in lines), quiet
    assert any("maect: training " in line and " on cpu x 1 (32-true)" in line for line in lines)
    assert any("maect: extending " in line for line in lines)
    assert "GPU available" in verbose and "maect: training " in verbose


@pytest.mark.parametrize(
    ("script", "policy", "expected"),
    [
        ("import maect", None, "PASSIVE"),  # set before torch loads (libgomp reads it then)
        ("import maect", "ACTIVE", "ACTIVE"),  # the user's choice stands
        ("from maect.cli import main", None, "PASSIVE"),  # the console script's import
        ("import torch, maect", None, "None"),  # too late to matter: left alone
    ],
)
def test_the_openmp_wait_policy_is_passive_unless_chosen(script, policy, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    code = f"{script}; import os, sys; print(os.environ.get('OMP_WAIT_POLICY'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == expected, done.stderr


def test_ctrl_c_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", dict(COMMANDS))

    @command("stuck", "Waits for Ctrl-C.")
    def cmd_stuck(inv: Invocation) -> None:
        raise KeyboardInterrupt

    code, out, err = _run(capsys, "stuck")
    assert code == 130 and out == ""
    assert err == "maect stuck: interrupted; the same command resumes a training run\n"
