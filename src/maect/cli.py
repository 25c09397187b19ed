"""Command line: ``maect COMMAND [POSITIONAL ...] name=value ... [key=value ...] [--dry-run]``.

Every command is declared once, with :func:`command`: its ``name=value`` arguments (and bare
positional arguments, which come first), a summary, what its ``key=value`` overrides configure, and
examples. Parsing, ``maect COMMAND --help`` and the argument errors follow from that declaration.
Adding a command is a decorated function::

    @command(
        "shards",
        "Pack a dataset into shards.",
        Arg("data", "NAME", "dataset name"),
        Arg("out", "DIR", "output folder"),
        overrides="any data.* key, e.g. data.root=/data",
        examples=("maect shards data=imagefolder out=/data/shards data.root=/data/in",),
    )
    def cmd_shards(inv: Invocation) -> None:
        from maect.shards import write_shards  # heavy imports inside the handler

        write_shards(inv.values["data"], inv.values["out"], inv.overrides, dry_run=inv.dry_run)

Nothing heavy (torch, timm, Lightning) is imported before a handler runs, so ``maect --help``,
``maect COMMAND --help``, ``maect --version`` and argument errors answer at once. Errors whose
message is the whole story (:data:`USAGE_ERRORS`) are printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import maect
from maect.config import ConfigError

# Errors printed as one line (exit code 2), by module: a module that was never imported cannot
# have raised its errors, so they are looked up only among the loaded modules.
USAGE_ERRORS = {
    "maect.config": ("ConfigError",),
    "maect.checkpoints": ("CheckpointError", "CheckpointWriteError"),
    "maect.data.datasets": ("DataNotFoundError",),
    "maect.faults": ("NonFiniteLossError",),
}


def usage_error_types() -> tuple[type[BaseException], ...]:
    """The :data:`USAGE_ERRORS` classes of the modules loaded so far."""
    found = []
    for module_name, names in USAGE_ERRORS.items():
        module = sys.modules.get(module_name)
        found += [getattr(module, name) for name in names if hasattr(module, name)]
    return tuple(found)


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Arg:
    """One argument of a command: ``name=METAVAR``, or a bare ``METAVAR`` when ``positional``
    (positional arguments come first, in their declared order)."""

    name: str
    metavar: str
    help: str
    required: bool = True
    positional: bool = False

    def usage(self) -> str:
        text = self.metavar if self.positional else f"{self.name}={self.metavar}"
        return text if self.required else f"[{text}]"


@dataclass(frozen=True)
class Command:
    """A declared command (see :func:`command`)."""

    name: str
    summary: str  # one line, shown in `maect --help`
    handler: Callable[[Invocation], None]
    args: tuple[Arg, ...]
    overrides: str  # what dotted.key=value arguments set ("" if the command takes none)
    examples: tuple[str, ...]
    dry_run: bool
    details: str  # more lines for `maect COMMAND --help`

    @property
    def positionals(self) -> list[Arg]:
        return [a for a in self.args if a.positional]

    def usage(self) -> str:
        parts = [f"maect {self.name}", *(a.usage() for a in self.args)]
        if self.overrides:
            parts.append("[key=value ...]")
        if self.dry_run:
            parts.append("[--dry-run]")
        return " ".join([*parts, "[-v] [-h]"])

    def description(self) -> str:
        rows = [(a.usage().strip("[]"), a.help) for a in self.args]
        if self.overrides:
            rows.append(("key=value", self.overrides))
        width = max(len(left) for left, _ in rows) if rows else 0
        lines = [f"  {left:<{width}}  {help_}" for left, help_ in rows]
        text = f"{self.summary}\n{self.details}".strip()
        return text + ("\n\narguments:\n" + "\n".join(lines) if lines else "")

    def parser(self) -> argparse.ArgumentParser:
        parser = _Parser(
            prog=f"maect {self.name}",
            usage=self.usage(),
            description=self.description(),
            epilog="examples:\n" + "\n".join(f"  {e}" for e in self.examples)
            if self.examples
            else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument("tokens", nargs="*", help=argparse.SUPPRESS)
        if self.dry_run:
            parser.add_argument(
                "--dry-run",
                action="store_true",
                help="print the resolved config and what the command would do; write nothing",
            )
        _add_verbose(parser)
        return parser


@dataclass
class Invocation:
    """A parsed command line: the command's own arguments, the overrides and the flags."""

    command: Command
    values: dict[str, str]
    overrides: list[str]
    dry_run: bool = False
    verbose: bool = False


COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    summary: str,
    *args: Arg,
    overrides: str = "",
    examples: tuple[str, ...] = (),
    dry_run: bool = False,
    details: str = "",
) -> Callable[[Callable[[Invocation], None]], Callable[[Invocation], None]]:
    """Declare a command: its arguments, help and examples; the decorated function runs it."""

    def register(handler: Callable[[Invocation], None]) -> Callable[[Invocation], None]:
        COMMANDS[name] = Command(
            name, summary, handler, args, overrides, examples, dry_run, details
        )
        return handler

    return register


class _Parser(argparse.ArgumentParser):
    """argparse that raises its errors (printed as one line by :func:`main`) instead of exiting."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also show Lightning's notes and tips and the libraries' warnings",
    )


def parse_invocation(cmd: Command, argv: list[str]) -> Invocation:
    """Split a command's arguments into its declared ``name=value`` arguments and overrides."""
    ns = cmd.parser().parse_intermixed_args(argv)
    tokens = list(ns.tokens)
    values: dict[str, str] = {}
    for positional in cmd.positionals:  # bare values first, in the declared order
        if tokens and "=" not in tokens[0]:
            values[positional.name] = tokens.pop(0)
    own = {a.name for a in cmd.args if not a.positional}
    overrides: list[str] = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep:
            raise ConfigError(f"argument '{token}' is not of the form key=value")
        if key in own:
            if key in values:
                raise ConfigError(f"{key}= is given twice")
            if not value:
                arg = next(a for a in cmd.args if a.name == key)
                raise ConfigError(f"{key}= is empty ({arg.usage()}: {arg.help})")
            values[key] = value
        elif cmd.overrides:
            overrides.append(token)
        else:
            known = ", ".join(f"{a}=" for a in sorted(own)) or "none"
            raise ConfigError(f"unknown argument '{token}' (arguments: {known})")
    missing = [a for a in cmd.args if a.required and a.name not in values]
    if missing:
        what = "; ".join(f"{a.usage()} ({a.help})" for a in missing)
        raise ConfigError(f"missing {what}; see maect {cmd.name} --help")
    return Invocation(
        cmd, values, overrides, getattr(ns, "dry_run", False), getattr(ns, "verbose", False)
    )


def top_parser() -> argparse.ArgumentParser:
    """``maect [-h] [--version] [-v] COMMAND ...``: the command list and the global flags."""
    width = max(len(n) for n in COMMANDS)
    listing = "\n".join(f"  {n:<{width}}  {c.summary}" for n, c in COMMANDS.items())
    parser = _Parser(
        prog="maect",
        usage="maect [-h] [--version] [-v] COMMAND [ARGS ...]",
        description="MAE, MAE-CT and CAN pretraining and evaluation of Vision Transformers."
        f"\n\ncommands:\n{listing}",
        epilog="`maect COMMAND --help` shows a command's arguments and examples. Config keys are "
        "set as\ndotted.key=value, e.g. trainer.epochs=2; `maect config RECIPE` lists them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"maect {maect.__version__}")
    _add_verbose(parser)
    return parser


# --------------------------------------------------------------------------- shared helpers


def print_yaml(data: Any, header: str = "") -> None:
    """Print ``data`` as block YAML (``header`` first, as ``#`` comment lines)."""
    import yaml

    for line in header.splitlines():
        print(f"# {line}")
    print(yaml.safe_dump(data, sort_keys=False), end="")


def yaml_value(value: Any) -> str:
    """A value as it is written in a ``key=value`` override (YAML flow style)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("...").strip()


def describe_keys(obj: Any, sections: set[str] | None = None, prefix: str = "") -> list[tuple]:
    """``(dotted key, value, help)`` rows of a config dataclass, sections as header rows
    ``(section, None, help)``; ``sections`` limits the nested sections shown."""
    from maect.config import field_help, first_phrase

    helps = field_help(type(obj))
    rows: list[tuple] = []
    nested = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            if sections is None or f.name in sections:
                nested.append((f.name, value))
        else:
            rows.append((f"{prefix}{f.name}", yaml_value(value), helps.get(f.name, "")))
    for name, value in nested:
        summary = " ".join((type(value).__doc__ or "").split("\n\n")[0].split())
        rows.append((f"{prefix}{name}", None, first_phrase(summary)))
        rows += describe_keys(value, None, f"{prefix}{name}.")
    return rows


def print_keys(rows: list[tuple], header: str) -> None:
    """Print :func:`describe_keys` rows as ``key=value  help`` lines under ``# section`` lines."""
    width = min(44, max((len(f"{k}={v}") for k, v, _ in rows if v is not None), default=0))
    print(f"# {header}")
    for key, value, help_ in rows:
        if value is None:
            print(f"\n# {key}: {help_.replace('``', '')}")
        else:
            print(f"{f'{key}={value}':<{width}}  {help_.replace('``', '')}".rstrip())


def training_dry_run(cfg, command_name: str, out: str) -> None:
    """Check a training command like the real run does, then print its config and plan."""
    from maect.engine import check_trainer
    from maect.rundir import check_out_dir, plan_run

    check_trainer(cfg)
    check_out_dir(out)
    if command_name == "finetune":
        from maect.finetuning import RESULT_FILE

        plan = plan_run(out, cfg.to_dict(), RESULT_FILE, extendable=False)
    else:
        plan = plan_run(out, cfg.to_dict())
    print_yaml(
        cfg.to_dict(),
        f"maect {command_name}: config.yaml of out={out} (dry run: nothing is written)\n"
        f"out={out}: {plan.describe()}",
    )


# The module and function that train the config of each training command.
TRAINERS = {
    "pretrain": ("maect.engine", "pretrain"),
    "tune": ("maect.tuning", "tune"),
    "finetune": ("maect.finetuning", "finetune"),
}


def train_command(
    inv: Invocation,
    command_name: str,
    extra: tuple[str, ...] = (),
    prepare: Callable[[Any], Any] | None = None,
) -> None:
    """The body of pretrain, tune and finetune: the config of ``recipe=`` plus the overrides (and
    ``extra`` overrides), checked to be for ``command_name`` and passed through ``prepare``; a dry
    run prints it with its plan, a real one trains into ``out=`` and prints the run directory."""
    from maect.config import check_command, load_config

    cfg = load_config(inv.values["recipe"], [*inv.overrides, *extra])
    check_command(cfg, command_name)
    if prepare is not None:
        cfg = prepare(cfg)
    if inv.dry_run:
        training_dry_run(cfg, command_name, inv.values["out"])
        return
    module, function = TRAINERS[command_name]
    train = getattr(importlib.import_module(module), function)
    print(f"run directory: {train(cfg, inv.values['out'])}")


# --------------------------------------------------------------------------- commands

RECIPE_HELP = "method recipe: a shipped name (see `maect recipes`) or a YAML file"
RUN_OVERRIDES = "any config key as dotted.key=value, e.g. trainer.epochs=2 (`maect config RECIPE`)"


@command(
    "pretrain",
    "Pretrain an encoder (MAE, CAN, SimCLR) into a run directory.",
    Arg("recipe", "NAME", RECIPE_HELP),
    Arg("out", "DIR", "the run directory: config.yaml, checkpoints/, metrics.csv, encoder.pt"),
    overrides=RUN_OVERRIDES,
    examples=(
        "maect pretrain recipe=mae/fmnist_vit_t out=runs/mae",
        "maect pretrain recipe=mae/fmnist_vit_t out=runs/quick trainer.epochs=2 data.subset=2000",
        "maect pretrain recipe=can/fmnist_vit_t out=runs/can --dry-run",
    ),
    dry_run=True,
    details="Rerunning the same command resumes an interrupted run from its last checkpoint and "
    "does nothing\non a finished one; raising trainer.epochs on a finished run continues it "
    "(docs/design.md).",
)
def cmd_pretrain(inv: Invocation) -> None:
    train_command(inv, "pretrain")


@command(
    "tune",
    "MAE-CT or MIM-Refiner: heads on a frozen MAE encoder, then tuning it.",
    Arg("recipe", "NAME", "MAE-CT or MIM-Refiner recipe, e.g. maect/fmnist_vit_t"),
    Arg("init", "RUN", "the MAE run directory or checkpoint to tune"),
    Arg("out", "DIR", "the run directory: head/, tune/, config.yaml, encoder.pt"),
    overrides=RUN_OVERRIDES,
    examples=(
        "maect tune recipe=maect/fmnist_vit_t init=runs/mae out=runs/maect",
        "maect tune recipe=maectaug/fmnist_vit_t init=runs/mae out=runs/maectaug "
        "maect.head_epochs=2",
    ),
    dry_run=True,
    details="Stage 2 trains an NNCLR head on the frozen encoder (out/head/), stage 3 tunes the "
    "encoder's top\nblocks with it (out/tune/). Rerunning resumes either stage; raising "
    "trainer.epochs on a finished\nrun continues stage 3.",
)
def cmd_tune(inv: Invocation) -> None:
    def set_init(cfg):
        from maect.tuning import with_init

        return with_init(cfg, inv.values["init"])

    train_command(inv, "tune", prepare=set_init)


@command(
    "finetune",
    "Fine-tune an encoder end to end on labelled data (classifier.pt, finetune.json).",
    Arg(
        "source",
        "SOURCE",
        "the encoder to fine-tune: a run directory, a checkpoint file, or scratch",
        positional=True,
    ),
    Arg("recipe", "NAME", "fine-tuning recipe, e.g. finetune/fmnist_vit_t (see `maect recipes`)"),
    Arg("out", "DIR", "the run directory: config.yaml, checkpoints/, classifier.pt, finetune.json"),
    overrides=RUN_OVERRIDES,
    examples=(
        "maect finetune runs/mae recipe=finetune/fmnist_vit_t out=runs/mae-ft",
        "maect finetune scratch recipe=finetune/fmnist_vit_t out=runs/scratch-ft",
    ),
    dry_run=True,
    details="Rerunning the same command resumes an interrupted run and does nothing on a "
    "finished one.\ntrainer.epochs=0 scores SOURCE without training.",
)
def cmd_finetune(inv: Invocation) -> None:
    train_command(inv, "finetune", (f"finetune.init={inv.values['source']}",))


@command(
    "evaluate",
    "k-NN, linear probe, low-shot and k-means on frozen features (eval.json).",
    Arg(
        "source",
        "SOURCE",
        "a run directory, a checkpoint file, `pixels` (raw-pixel baseline), or an eval.json "
        "(its table is printed)",
        positional=True,
    ),
    overrides="any evaluation key, e.g. protocols=knn,linear, data=NAME (short for data.name), "
    "knn.k=20\n" + " " * 13 + "(`maect config evaluate` lists them)",
    examples=(
        "maect evaluate runs/maect protocols=knn,linear,lowshot,cluster",
        "maect evaluate pixels data=fashion-mnist",
        "maect evaluate runs/maect/eval.json",
        "torchrun --nproc_per_node=2 -m maect evaluate runs/maect   # ranks share the extraction",
    ),
    dry_run=True,
    details="Features are extracted once (and cached); each protocol's result goes to eval.json "
    "in the run\ndirectory (`out=` elsewhere) and is printed as a table.",
)
def cmd_evaluate(inv: Invocation) -> None:
    from pathlib import Path

    source = inv.values["source"]
    if source.endswith(".json"):
        if not Path(source).is_file():
            raise ConfigError(f"no such file: {source}")
        import json

        from maect.evaluation.command import format_table

        print(format_table(json.loads(Path(source).read_text())))
        return
    from maect.evaluation.command import evaluate, load_eval_config

    cfg = load_eval_config(inv.overrides)
    if inv.dry_run:
        print_yaml(
            dataclasses.asdict(cfg),
            f"maect evaluate {source}: evaluation settings (dry run: nothing is computed)",
        )
        return
    import torch.distributed

    from maect.distributed import init_from_env

    created = init_from_env()  # several processes (torchrun) share the feature extraction
    try:
        evaluate(source, cfg)
    finally:
        if created:
            torch.distributed.destroy_process_group()


@command(
    "run",
    "Run a pipeline: training stages, evaluations and the comparison table.",
    Arg("recipe", "PIPELINE", "pipeline recipe, e.g. pipelines/demo_fmnist (see `maect recipes`)"),
    Arg("out", "DIR", "pipeline directory (default: the pipeline's `out`)", required=False),
    overrides="eval.KEY=value goes to every evaluation, any other key=value to every "
    "training stage",
    examples=(
        "maect run recipe=pipelines/demo_fmnist",
        "maect run recipe=pipelines/demo_fmnist out=runs/demo2 trainer.seed=1 eval.knn.k=10",
        "maect run recipe=pipelines/reproduce_fmnist --dry-run",
    ),
    dry_run=True,
    details="Each stage is a run directory OUT/STAGE made by `maect pretrain` or `maect tune`: "
    "a finished stage\nis skipped, an interrupted one resumes. Evaluations write "
    "OUT/SOURCE/eval.json; the table goes to\nstdout, OUT/results.json and OUT/results.md.",
)
def cmd_run(inv: Invocation) -> None:
    from maect.pipeline import plan_pipeline, run_pipeline

    recipe, out = inv.values["recipe"], inv.values.get("out")
    if inv.dry_run:
        print_yaml(
            plan_pipeline(recipe, out, inv.overrides),
            f"maect run recipe={recipe}: stages and evaluations (dry run: nothing is written)",
        )
        return
    run_pipeline(recipe, out, inv.overrides)


@command(
    "report",
    "Write RUN_DIR/report.html (tables, curves, reconstructions, embeddings).",
    Arg("run_dir", "RUN_DIR", "a run or pipeline directory", positional=True),
    examples=("maect report runs/demo_fmnist", "maect report runs/mae"),
)
def cmd_report(inv: Invocation) -> None:
    from maect.report import write_report

    print(write_report(inv.values["run_dir"]))


@command(
    "shards",
    "Write a dataset into streaming shards (data.name=shards reads them).",
    Arg("source", "SRC", "a dataset name or an image folder with train/ and val/", positional=True),
    Arg(
        "dst", "DST", "a new local folder (copy it to an object store afterwards)", positional=True
    ),
    Arg("root", "DIR", "the source dataset's folder (as data.root)", required=False),
    Arg("chunk_bytes", "SIZE", "upper bound of a chunk file, e.g. 64MB (default)", required=False),
    Arg("synthetic_size", "N", "images of the synthetic dataset (tests)", required=False),
    Arg("img_size", "N", "image side of the synthetic dataset (tests)", required=False),
    Arg("channels", "N", "channels of the synthetic dataset (tests)", required=False),
    examples=(
        "maect shards fashion-mnist /data/fmnist-shards",
        "maect shards /data/imagenet /data/imagenet-shards chunk_bytes=128MB",
    ),
)
def cmd_shards(inv: Invocation) -> None:
    from maect.data.shards import write_shards

    v = inv.values
    sizes = {}
    for key in ("synthetic_size", "img_size", "channels"):
        if key in v:
            try:
                sizes[key] = int(v[key])
            except ValueError:
                raise ConfigError(f"{key}= expects an integer, got '{v[key]}'") from None
    written = write_shards(
        v["source"], v["dst"], v.get("root"), v.get("chunk_bytes", "64MB"), **sizes
    )
    print(", ".join(f"{split}: {n} images" for split, n in written.items()), f"-> {v['dst']}")


@command(
    "recipes",
    "List the shipped recipes and pipelines and the command that takes each.",
    Arg(
        "filter",
        "FILTER",
        "show only names containing FILTER (or matching it as a shell pattern, e.g. '*in1k*')",
        required=False,
        positional=True,
    ),
    examples=("maect recipes", "maect recipes fmnist", "maect recipes pipelines"),
)
def cmd_recipes(inv: Invocation) -> None:
    from maect.config import recipe_summaries

    pattern = inv.values.get("filter", "")
    rows = recipe_summaries(pattern)
    if not rows:
        raise ConfigError(f"no recipe matches '{pattern}' (`maect recipes` lists them all)")
    width = max(len(name) for name, _, _ in rows)
    for name, command_name, summary in rows:
        print(f"{name:<{width}}  {command_name:<8}  {summary}".rstrip())


@command(
    "config",
    "List a recipe's keys with their values and help.",
    Arg("recipe", "RECIPE", "a method recipe (see `maect recipes`) or `evaluate`", positional=True),
    overrides="overrides to apply first, as dotted.key=value",
    examples=(
        "maect config mae/fmnist_vit_t",
        "maect config maect/fmnist_vit_t maect.topk=10",
        "maect config evaluate",
    ),
    details="The keys are printed as key=value lines, ready to be used as overrides; "
    "`maect config evaluate`\nlists the keys of `maect evaluate`.",
)
def cmd_config(inv: Invocation) -> None:
    from maect.config import METHOD_COMMANDS, load_config

    recipe = inv.values["recipe"]
    if recipe == "evaluate":
        from maect.evaluation.command import load_eval_config

        cfg = load_eval_config(inv.overrides)
        rows = describe_keys(cfg)
        print_keys(rows, "maect evaluate SOURCE key=value ...: evaluation settings")
        return
    cfg = load_config(recipe, inv.overrides)
    header = f"{recipe}: method {cfg.method}, trained by `maect {METHOD_COMMANDS[cfg.method]}`"
    print_keys(describe_keys(cfg, set(cfg.to_dict())), header)


# --------------------------------------------------------------------------- entry point


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (tests and callers may replace it between calls)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


# Lightning's notes (device summary, tips, "Loading train_dataloader", "`weights_only` was not
# set", "Restoring states", "`Trainer.fit` stopped"): INFO records of these loggers, hidden unless
# --verbose (all but the note after Ctrl-C). maect logs what matters itself (resuming, extending,
# device and batches).
QUIET_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.trainer.connectors.checkpoint_connector",
    "lightning.pytorch.accelerators.cuda",
)
# Library warnings with nothing for a maect user to do, hidden unless --verbose.
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # torch's pytree, called by Lightning
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"GPU available but not used",
    r".*does not have many workers which may be a bottleneck",
    r".*You are using `torch.load` with `weights_only=False`",
)


def _quiet_notes(record: logging.LogRecord) -> bool:
    """Let a QUIET_LOGGERS record through if it is a warning, or the note that Lightning
    stops after Ctrl-C (the user should see that the interrupt was taken)."""
    return record.levelno >= logging.WARNING or "Detected KeyboardInterrupt" in record.getMessage()


def configure_logging(verbose: bool) -> None:
    """maect's own messages on stderr as ``maect: ...``; Lightning's notes and tips and the
    library warnings in :data:`QUIET_WARNINGS` only if ``verbose``."""
    logger = logging.getLogger("maect")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("maect: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    for name in QUIET_LOGGERS:
        if verbose:
            logging.getLogger(name).removeFilter(_quiet_notes)
        else:
            logging.getLogger(name).addFilter(_quiet_notes)
    if not verbose:
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)


def command_name(argv: list[str], split: int) -> str:
    """The command at ``argv[split]`` (after the global flags), or a ConfigError."""
    from maect.config import did_you_mean

    if split == len(argv):
        raise ConfigError(f"missing COMMAND, one of: {', '.join(COMMANDS)} (see maect --help)")
    name = argv[split]
    if name not in COMMANDS:
        raise ConfigError(
            f"unknown command '{name}'{did_you_mean(name, list(COMMANDS))} "
            f"(commands: {', '.join(COMMANDS)})"
        )
    return name


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``maect`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = next((i for i, token in enumerate(argv) if not token.startswith("-")), len(argv))
    where = "maect"
    try:
        try:  # argparse exits for --help and --version
            top = top_parser().parse_args(argv[:split])
            name = command_name(argv, split)
            where = f"maect {name}"
            inv = parse_invocation(COMMANDS[name], argv[split + 1 :])
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else 0
        inv.verbose = inv.verbose or getattr(top, "verbose", False)
        configure_logging(inv.verbose)
        inv.command.handler(inv)
    except KeyboardInterrupt:
        print(f"{where}: interrupted; the same command resumes a training run", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `maect config RECIPE | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        if not isinstance(err, usage_error_types()):
            raise
        print(f"{where}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
