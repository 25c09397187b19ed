"""Command line: ``maect <command> key=value ...``."""

from __future__ import annotations

import argparse
import logging
import sys

from maect.checkpoints import CheckpointError, CheckpointWriteError
from maect.config import ConfigError, available_recipes, load_config
from maect.data.datasets import DataNotFoundError
from maect.faults import NonFiniteLossError

# Errors whose message is the whole story: printed as one line, exit code 2.
USAGE_ERRORS = (
    ConfigError,
    CheckpointError,
    CheckpointWriteError,
    DataNotFoundError,
    NonFiniteLossError,
)


def split_assignments(
    tokens: list[str], required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> tuple[dict, list[str]]:
    """Separate the command's own ``name=value`` arguments from config overrides."""
    own: dict[str, str] = {}
    overrides: list[str] = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep:
            raise ConfigError(f"argument '{token}' is not of the form key=value")
        if key in required or key in optional:
            own[key] = value
        else:
            overrides.append(token)
    missing = [k for k in required if k not in own]
    if missing:
        raise ConfigError(f"missing required argument(s): {', '.join(f'{k}=...' for k in missing)}")
    return own, overrides


def cmd_pretrain(args: list[str]) -> None:
    """``maect pretrain recipe=NAME out=DIR [key=value ...]``."""
    from maect.engine import pretrain

    own, overrides = split_assignments(args, ("recipe", "out"))
    cfg = load_config(own["recipe"], overrides)
    run_dir = pretrain(cfg, own["out"])
    print(f"run directory: {run_dir}")


def cmd_tune(args: list[str]) -> None:
    """``maect tune recipe=NAME init=MAE_RUN_OR_CHECKPOINT out=DIR [key=value ...]``."""
    from maect.tuning import tune, with_init

    own, overrides = split_assignments(args, ("recipe", "init", "out"))
    cfg = with_init(load_config(own["recipe"], overrides), own["init"])
    run_dir = tune(cfg, own["out"])
    print(f"run directory: {run_dir}")


def cmd_finetune(args: list[str]) -> None:
    """``maect finetune SOURCE recipe=finetune/NAME out=DIR [key=value ...]``: fine-tune SOURCE
    (a run directory, a checkpoint, or ``scratch``) end to end on labelled data."""
    from maect.finetuning import finetune

    if not args or "=" in args[0]:
        raise ConfigError("missing SOURCE: a run directory, a checkpoint file or scratch")
    own, overrides = split_assignments(args[1:], ("recipe", "out"))
    cfg = load_config(own["recipe"], [*overrides, f"finetune.init={args[0]}"])
    run_dir = finetune(cfg, own["out"])
    print(f"run directory: {run_dir}")


def cmd_evaluate(args: list[str]) -> None:
    """``maect evaluate SOURCE [data=NAME] [protocols=knn,linear,lowshot,cluster] [key=value ...]``.

    SOURCE is a run directory, a checkpoint file, ``pixels`` (the raw-pixel baseline), or an
    ``eval.json`` whose table is printed.
    """
    import json
    from pathlib import Path

    import torch.distributed

    from maect.distributed import init_from_env
    from maect.evaluation.command import evaluate, format_table, load_eval_config

    if not args or "=" in args[0]:
        raise ConfigError("missing SOURCE: a run directory, a checkpoint, pixels or an eval.json")
    source, overrides = args[0], args[1:]
    if source.endswith(".json"):
        if not Path(source).is_file():
            raise ConfigError(f"no such file: {source}")
        print(format_table(json.loads(Path(source).read_text())))
        return
    cfg = load_eval_config(overrides)
    created = init_from_env()  # several processes (torchrun) share the feature extraction
    try:
        evaluate(source, cfg)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def cmd_run(args: list[str]) -> None:
    """``maect run recipe=pipelines/NAME [out=DIR] [key=value ...]`` (``eval.*`` keys go to the
    evaluations, the others to every training stage)."""
    from maect.pipeline import run_pipeline

    own, overrides = split_assignments(args, ("recipe",), optional=("out",))
    run_pipeline(own["recipe"], own.get("out"), overrides)


def cmd_report(args: list[str]) -> None:
    """``maect report RUN_DIR``: write ``RUN_DIR/report.html`` (a run or a pipeline directory)."""
    from maect.report import write_report

    if len(args) != 1 or "=" in args[0]:
        raise ConfigError("expected exactly one argument: RUN_DIR (a run or pipeline directory)")
    print(write_report(args[0]))


def cmd_shards(args: list[str]) -> None:
    """``maect shards SRC DST [root=DIR] [chunk_bytes=64MB]``: write dataset SRC (a dataset name
    or an image folder with train/ and val/) into streaming shards under DST."""
    from maect.data.shards import write_shards

    if len(args) < 2 or any("=" in a for a in args[:2]):
        raise ConfigError("expected SRC DST: a dataset name or image folder, and a new folder")
    options = ("root", "chunk_bytes", "synthetic_size", "img_size", "channels")
    own, extra = split_assignments(args[2:], (), optional=options)
    if extra:
        raise ConfigError(f"unknown argument(s) {', '.join(extra)}; known: {', '.join(options)}")
    sizes = {k: int(v) for k, v in own.items() if k in options[2:]}
    written = write_shards(
        args[0], args[1], own.get("root"), own.get("chunk_bytes", "64MB"), **sizes
    )
    print(", ".join(f"{split}: {n} images" for split, n in written.items()), f"-> {args[1]}")


def cmd_recipes(args: list[str]) -> None:
    """``maect recipes``: list the shipped recipes."""
    print("\n".join(available_recipes()))


COMMANDS = {
    "pretrain": cmd_pretrain,
    "recipes": cmd_recipes,
    "run": cmd_run,
    "tune": cmd_tune,
    "evaluate": cmd_evaluate,
    "finetune": cmd_finetune,
    "report": cmd_report,
    "shards": cmd_shards,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``maect`` console script."""
    parser = argparse.ArgumentParser(
        prog="maect",
        description="MAE, MAE-CT and CAN pretraining and evaluation of Vision Transformers.",
        epilog="Overrides: any config field as dotted.key=value, e.g. trainer.epochs=2",
    )
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("args", nargs="*", help="key=value arguments and config overrides")
    ns = parser.parse_args(argv)
    logger = logging.getLogger("maect")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("maect: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        COMMANDS[ns.command](ns.args)
    except USAGE_ERRORS as err:
        print(f"maect {ns.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
