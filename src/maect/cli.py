"""Command line: ``maect <command> key=value ...``."""

from __future__ import annotations

import argparse
import logging
import sys

from maect.checkpoints import CheckpointError
from maect.config import ConfigError, available_recipes, load_config
from maect.data.datasets import DataNotFoundError

USAGE_ERRORS = (ConfigError, CheckpointError, DataNotFoundError)


def split_assignments(tokens: list[str], required: tuple[str, ...]) -> tuple[dict, list[str]]:
    """Separate the command's own ``name=value`` arguments from config overrides."""
    own: dict[str, str] = {}
    overrides: list[str] = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep:
            raise ConfigError(f"argument '{token}' is not of the form key=value")
        if key in required:
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
    from maect.tuning import tune

    own, overrides = split_assignments(args, ("recipe", "init", "out"))
    cfg = load_config(own["recipe"], [*overrides, f"maect.init={own['init']}"])
    run_dir = tune(cfg, own["out"])
    print(f"run directory: {run_dir}")


def cmd_recipes(args: list[str]) -> None:
    """``maect recipes``: list the shipped recipes."""
    print("\n".join(available_recipes()))


COMMANDS = {"pretrain": cmd_pretrain, "recipes": cmd_recipes, "tune": cmd_tune}


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
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("maect: %(message)s"))
    logging.getLogger("maect").addHandler(handler)
    logging.getLogger("maect").setLevel(logging.INFO)
    try:
        COMMANDS[ns.command](ns.args)
    except USAGE_ERRORS as err:
        print(f"maect {ns.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
