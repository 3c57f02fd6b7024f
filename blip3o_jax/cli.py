"""Command-line plumbing shared by every CLI: `--config path.py` with `--config.a.b=value` overrides, and
user errors reported as one line with a non-zero exit instead of a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags


class UserError(ValueError):
    """A mistake in the user's input (path, config value, data): printed as one line, exit status 2."""


def define_config_flag(default: str | None = None):
    from ml_collections import config_flags

    return config_flags.DEFINE_config_file("config", default, "Path to an ml_collections config file (.py).",
                                           lock_config=True)


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run` that turns known user errors into one line on stderr and exit status 2."""
    from blip3o_jax.convert.common import ConversionError

    def wrapped(argv):
        try:
            main(argv)
        except (UserError, ConversionError, FileNotFoundError, FileExistsError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped)


def load_config(path: str, overrides: dict | None = None):
    """Loads an ml_collections config file outside absl (tests, notebooks); `overrides` use dotted keys."""
    import importlib.util
    import os

    name, _, arg = path.partition(":")  # "file.py:arg" passes arg to get_config, as config_flags does
    if not os.path.exists(name):
        raise UserError(f"config file {name} does not exist")
    spec = importlib.util.spec_from_file_location("_blip3o_config", name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
    for dotted, value in (overrides or {}).items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


FLAGS = flags.FLAGS
