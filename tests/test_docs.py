"""Every command and Python example in README.md and docs/*.md runs.

Commands are the lines of fenced code blocks that start with ``maect``, ``python -m maect``,
``torchrun``/``srun`` (their ``-m maect`` part), ``make``, ``pip`` or ``sudo``. How each is run
here, cheaply:

- ``maect pretrain|tune|evaluate|run``: with ``--dry-run`` (config, trainer settings and ``out=``
  checked, nothing trained); the real runs, at tiny sizes, are ``scripts/walkthrough.sh``
  (``tests/test_walkthrough.py``, slow);
- ``maect recipes|config``, ``--help``, ``--version``: as written;
- ``maect report DIR``, ``maect evaluate FILE.json`` and ``maect shards SRC DST`` need results or
  data: their arguments are parsed here (the walkthrough runs the first two);
- ``make TARGET``: the target exists (``make -n``);
- ``pip``/``sudo apt-get``: installation, not run here (the walkthrough installs a fresh clone).

Synopsis lines (``[key=value ...]``) are only parsed. Python blocks run as written in a fresh
interpreter, in a folder holding a tiny ``runs/mae`` and ``runs/ft_mae``. A block that cannot run
here (it needs ImageNet, say) is marked by the line ``<!-- docs-test: skip (REASON) -->`` right
before it, and is reported as skipped with that reason.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from maect.cli import COMMANDS, parse_invocation
from maect.engine import pretrain
from tests.conftest import TINY_OVERRIDES, run_cli
from tests.test_finetune import FT_TINY

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STARTS = ("maect ", "python -m maect", "torchrun ", "srun ", "make ", "pip ", "sudo ")
DRY_RUN = {name for name, cmd in COMMANDS.items() if cmd.dry_run}
NEED_RESULTS = {"report", "shards"}  # a run to report, a dataset of the user's to pack


SKIP_MARK = re.compile(r"<!-- docs-test: skip \((.+)\) -->")


def fenced_blocks(path: Path) -> list[tuple[str, str, int, str]]:
    """``(language, text, first line number, skip reason or "")`` of every fenced code block of a
    markdown file."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            mark = SKIP_MARK.fullmatch(lines[i - 1].strip()) if i else None
            lang, start = lines[i][3:].strip(), i + 1
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            blocks.append((lang, "\n".join(lines[start:i]), start + 1, mark[1] if mark else ""))
        i += 1
    return blocks


def command_lines() -> list[tuple[str, list[str]]]:
    """``("FILE:LINE", argv)`` of every documented command (continuations joined, comments
    dropped)."""
    found = []
    for path in DOCS:
        for lang, text, first, _ in fenced_blocks(path):
            if lang not in ("", "bash", "sh", "console"):
                continue
            joined = text.replace("\\\n", " ")
            for offset, line in enumerate(joined.splitlines()):
                if line.strip().startswith(STARTS):
                    where = f"{path.relative_to(ROOT)}:{first + offset}"
                    found.append((where, shlex.split(line, comments=True)))
    return found


def python_blocks() -> list[tuple[str, str, str]]:
    return [
        (f"{path.relative_to(ROOT)}:{first}", text, skip)
        for path in DOCS
        for lang, text, first, skip in fenced_blocks(path)
        if lang == "python"
    ]


def maect_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``maect`` / ``-m maect`` (``None`` if the line runs no maect)."""
    if argv[0] == "maect":
        return argv[1:]
    if "-m" in argv and argv[argv.index("-m") + 1] == "maect":
        return argv[argv.index("-m") + 2 :]
    return None


def test_the_docs_hold_commands_of_every_kind():
    kinds = {argv[0] for _, argv in command_lines()}
    assert {"maect", "python", "torchrun", "srun", "make", "pip"} <= kinds
    assert len(command_lines()) > 30 and python_blocks()


@pytest.mark.parametrize(("where", "argv"), command_lines(), ids=lambda v: str(v))
def test_documented_command_runs(where, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative out= paths land in a scratch folder
    if argv[0] in ("pip", "sudo"):
        pytest.skip("installation: run by scripts/walkthrough.sh on a fresh clone")
    if argv[0] == "make":
        targets = [a for a in argv[1:] if not a.startswith("-") and "=" not in a]
        done = subprocess.run(["make", "-n", "-C", str(ROOT), *targets], capture_output=True)
        assert done.returncode == 0, f"{where}: {done.stderr.decode()}"
        return
    args = maect_args(argv)
    assert args is not None, f"{where}: {argv[0]} line without `-m maect`"
    if args == ["..."]:
        return  # "python -m maect ...": the same commands as above
    name = args[0]
    assert name in COMMANDS or name.startswith("-"), f"{where}: unknown command {name}"
    if any(a.startswith("[") for a in args):  # a synopsis: "... out=DIR [key=value ...]"
        declared = {a.name for a in COMMANDS[name].args}
        named = {a.split("=")[0] for a in args[1:] if "=" in a and not a.startswith("[")}
        assert named <= declared, f"{where}: {named - declared} are not arguments of {name}"
        return
    source = args[1] if len(args) > 1 else ""
    if name in NEED_RESULTS or (name == "evaluate" and source.endswith(".json")):
        parse_invocation(COMMANDS[name], args[1:])  # run for real by the walkthrough
        return
    code = run_cli(*([*args, "--dry-run"] if name in DRY_RUN else args))
    assert code == 0, f"{where}: {shlex.join(argv)}\n{capsys.readouterr().err}"
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == [], f"{where}: a dry run wrote {written}"


@pytest.fixture(scope="module")
def tiny_mae_run(tmp_path_factory) -> Path:
    """A folder holding ``runs/mae`` (a finished 1-epoch run of a tiny ViT) and ``runs/ft_mae``
    (a 1-epoch fine-tuning of it)."""
    from maect.config import load_config
    from maect.finetuning import finetune

    folder = tmp_path_factory.mktemp("docs")
    quick = ["trainer.epochs=1", "trainer.monitor_every=0", "trainer.recon_every=9"]
    pretrain(load_config("mae/fmnist_vit_t", [*TINY_OVERRIDES, *quick]), folder / "runs" / "mae")
    tuned = [*quick, f"finetune.init={folder / 'runs' / 'mae'}", "finetune.auto_augment="]
    finetune(load_config("finetune/fmnist_vit_t", [*FT_TINY, *tuned]), folder / "runs" / "ft_mae")
    return folder


@pytest.mark.parametrize(("where", "code", "skip"), python_blocks(), ids=lambda v: str(v)[:40])
def test_documented_python_runs(where, code, skip, tiny_mae_run, tmp_path):
    if skip:
        pytest.skip(f"{where}: {skip}")
    shutil.copytree(tiny_mae_run, tmp_path, dirs_exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{where}:\n{done.stderr[-3000:]}"
    if where.startswith("README.md"):  # tiny run: 28 x 28 px, 4 x 4 patches, width 32
        expected = r"torch\.Size\(\[8, 50, 32\]\)\ntorch\.Size\(\[8, 10\]\)\n"
        assert re.fullmatch(expected, done.stdout), done.stdout
