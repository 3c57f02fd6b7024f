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

    return config_flags.DEFINE_config_file(
        "config", default, "Path to an ml_collections config file (.py), as configs/NAME.py or configs/NAME.py:ARG "
        "(ARG is passed to its get_config, e.g. the data directory); any field is overridden with --config.a.b=value.",
        lock_config=True)


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if len(e.args) == 1 else str(e)
    text = text.replace("\\n", " ").replace("\\'", "'")
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a repr()-ed message (KeyError)
        text = text[1:-1]
    return " ".join(text.split())


_HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with a bad flag or `--config.x=y` override reported as one `error:` line, exit 2.
    `--help` / `-h` print the usage and exit 0 (absl exits 1 after printing it, and does not know `-h`)."""
    argv = [argv[0], *("--help" if a == "-h" else a for a in argv[1:])]
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:  # absl's help flags exit (1) once the usage is printed
        if any(a.split("=", 1)[0] in _HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections rejecting an override
        print(f"error: {_unknown_override(argv) or 'bad --config override: ' + _one_line(e)}", file=sys.stderr)
        sys.exit(2)


def _unknown_override(argv: list[str]) -> str | None:
    """'--config.mesh.dat=2: config.mesh has no key 'dat' (valid: data, fsdp, tensor)' for the first bad key."""
    path = None
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    try:
        config = load_config(path) if path else None
    except Exception:  # noqa: BLE001  (the config itself is broken: the caller reports the original error)
        return None
    if config is None:
        return None
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        node, where = config, "config"
        for key in path:
            if not hasattr(node, "keys"):
                break
            if key not in node:
                return f"{arg}: {where} has no key {key!r} (valid: {', '.join(sorted(node.keys()))})"
            node, where = node[key], f"{where}.{key}"
    return None


def _help_of(module: str, doc: str | None) -> None:
    """`--help` shows `doc` and every flag `module` defines (and `--config`), however the tool was started: absl lists
    only the flags of the `__main__` file, which is a shim or a console-script wrapper for a tool in the package."""
    if doc:
        sys.modules["__main__"].__doc__ = doc
    key_flags = list(FLAGS.get_key_flags_for_module(module))
    if "config" in FLAGS:
        key_flags.append(FLAGS["config"])
    for flag in key_flags:
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main: Callable[[list[str]], None], *, module: str | None = None, doc: str | None = None) -> None:
    """`absl.app.run` that turns known user errors into one line on stderr and exit status 2. `module` (the tool's
    `__name__`) and `doc` (its usage text) make `--help` describe the tool's flags."""
    from blip3o_jax.convert.common import ConversionError
    from blip3o_jax.data.sources import DatasetError, NoValidSampleError
    from blip3o_jax.data.tar_index import TarIndexError

    user_errors = (UserError, ConversionError, FileNotFoundError, FileExistsError, DatasetError, NoValidSampleError,
                   TarIndexError)
    if module is not None:
        _help_of(module, doc)
    from blip3o_jax import hostmem

    hostmem.keep_freed_memory()  # XLA:CPU's per-call temporary buffers stay mapped (blip3o_jax/hostmem.py)

    def wrapped(argv):
        try:
            main(argv)
        except user_errors as e:
            print(f"error: {_one_line(e)}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            if e.filename is None:  # not about a path the user gave (a real bug): keep the traceback
                raise
            # a path of the user's (workdir, output, data) that cannot be read or written
            print(f"error: {e.filename}: {e.strerror or _one_line(e)}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped, flags_parser=_parse_flags)


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
