"""The command line and the YAML config file, both made from the settings tree (config.py).

Every setting's option is its field name with dashes; a config file's keys are the same long
option names; the command line overrides the file. `parse_config(argv)` returns the checked
RunConfig; `write_config` writes the resolved settings (OUT/config.yaml), which `--config` reads back.
"""
import argparse
import os
import typing
from dataclasses import fields

import yaml

from .config import GROUPS, RunConfig
from .errors import UsageError, option
from .manifest import replaced_atomically

CONFIG = "--config"   # the one option that is not a setting: the file of settings
CONFIG_HEADER = "# The resolved settings of this run (spin-train --config reads this file).\n"


def _value_type(annotation):
    """(scalar type, is a tuple) of a field's annotation: int, float, str, bool, X | None, tuple[X, ...]."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]   # X of X | None and tuple[X, ...]
    return (args[0] if args else annotation), typing.get_origin(annotation) is tuple


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message):   # argparse would print the usage of every option first: 50 lines
        self.exit(2, f"error: {message} (--help lists the options)\n")


def build_parser(description=None):
    """argparse over every setting, plus --config; every default is SUPPRESS, so a parse holds only
    what was typed (the file and the tree's defaults fill the rest)."""
    parser = OneLineErrors(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                           argument_default=argparse.SUPPRESS)
    parser.add_argument(CONFIG, metavar="FILE", help="YAML file of settings, keyed by the long option names "
                                                     "(e.g. 'micro-batch-size: 4'); the command line overrides it")
    for group_name, group in GROUPS.items():
        section = parser.add_argument_group(group_name)
        for f in fields(group):
            kind, many = _value_type(f.type)
            meta = f.metadata
            text = meta["help"] + ("" if f.default in (None, False, ()) else f" (default: {_shown(f.default)})")
            kwargs = dict(help=text.replace("%", "%%"), dest=f"{group_name}.{f.name}")
            if kind is bool:
                # --X and --no-X, so that the command line can turn off what a config file turns on
                # (no_progress, a negation itself, has its one form)
                kwargs["action"] = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
            else:   # the metavar of a free value is the option's name, not the dest's "GROUP.NAME"
                kwargs.update(type=kind, choices=meta["choices"], nargs=(meta["nargs"] or "+") if many else None,
                              metavar=meta["metavar"] or (None if meta["choices"] else f.name.upper()))
            section.add_argument(option(f.name), **kwargs)
    return parser


def _shown(default):
    return " ".join(str(v) for v in default) if isinstance(default, tuple) else default


def read_config_file(path):
    """{"group.field": value} of a YAML file keyed by long option names."""
    if not os.path.isfile(path):
        raise UsageError(f"{CONFIG} {path!r}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"{CONFIG} {path!r}: not valid YAML ({exc})") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"{CONFIG} {path!r}: expected a mapping of option names to values, got "
                         f"{type(loaded).__name__}")
    by_key = {f.name.replace("_", "-"): (group_name, f) for group_name, group in GROUPS.items()
              for f in fields(group)}
    values = {}
    for key, value in loaded.items():
        name = str(key).removeprefix("--")
        if name not in by_key:
            raise UsageError(f"{CONFIG} {path!r}: unknown setting {key!r} (keys are long option names, e.g. "
                             f"'micro-batch-size')")
        group_name, f = by_key[name]
        values[f"{group_name}.{f.name}"] = _coerce(value, f, f"{CONFIG} {path!r}: {key}")
    return values


def _coerce(value, f, where):
    """A YAML value as the field's type (an int for a float, a scalar for a one-value list)."""
    kind, many = _value_type(f.type)
    if value is None:
        if f.default is None:
            return None
        raise UsageError(f"{where}: needs a value")
    items = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise UsageError(f"{where}: expected one value, got a list")
    converted = []
    for item in items:
        if kind is float and isinstance(item, (int, str)) and not isinstance(item, bool):
            try:
                item = float(item)   # an int, or a string: YAML reads 5e-7 (no dot) as a string
            except ValueError:
                pass
        if not isinstance(item, kind) or (kind is not bool and isinstance(item, bool)):
            raise UsageError(f"{where}: expected {kind.__name__}, got {item!r}")
        converted.append(item)
    return tuple(converted) if many else converted[0]


def parse_config(argv=None, description=None):
    """The RunConfig of a command line (and its --config file), checked."""
    given = vars(build_parser(description).parse_args(argv))
    values = read_config_file(given.pop("config")) if "config" in given else {}
    values.update({key: tuple(v) if isinstance(v, list) else v for key, v in given.items()})
    config = RunConfig()
    for key, value in values.items():
        group_name, name = key.split(".")
        setattr(getattr(config, group_name), name, value)
    return config.check()


def write_config(config, path):
    """The resolved settings as YAML, atomically."""
    with replaced_atomically(path) as f:
        f.write(CONFIG_HEADER)
        yaml.safe_dump(config.as_options(), f, sort_keys=False, allow_unicode=True)


def read_saved_options(path):
    """{long option name: value} of a config.yaml that write_config wrote."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}

