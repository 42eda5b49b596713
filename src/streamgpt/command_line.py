"""The command line of train.py and serve.py: what `--help` lists, and overrides checked before
Hydra composes anything.

- `--help` lists every config group as a user types it (`source@server.source=files`, not the
  schemas Hydra keeps in its ConfigStore), read from conf/ so it cannot go stale.
- A misspelt key, with or without `+` (`model.n_layr=2`, `+model.n_layr=2`), or an option a group
  does not have (`model=gpt5`), is refused in one line that names it and what exists, instead of
  Hydra's several lines and its hint to append the key (which then fails with a traceback).
"""

from __future__ import annotations

import sys
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class Group:
    name: str  # its folder under conf/: model, data/stream, source
    package: str | None  # where the primary config puts it (source@server.source), if elsewhere
    options: list[str]
    default: str | None

    @property
    def typed(self) -> str:
        """What a user types: `source@server.source`."""
        return f"{self.name}@{self.package}" if self.package else self.name


def groups(conf_dirs: list[Path], config_name: str) -> list[Group]:
    """The config groups that `config_name` (in the first of `conf_dirs`) uses, with the options
    of every one of `conf_dirs` (the search path; Hydra's own groups excluded)."""
    defaults: dict[str, tuple[str | None, str | None]] = {}
    for entry in OmegaConf.load(conf_dirs[0] / f"{config_name}.yaml").get("defaults", []):
        if isinstance(entry, str) or not hasattr(entry, "items"):
            continue
        for key, value in entry.items():
            key = str(key).removeprefix("override ").removeprefix("optional ")
            name, _, package = key.partition("@")
            defaults[name] = (package or None, value)
    found = []
    for name, (package, default) in defaults.items():
        folders = [d / name for d in conf_dirs if (d / name).is_dir()]
        if name.startswith("hydra") or not folders:
            continue
        options = sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})
        if not options:  # conf/local/ before anyone put a config there
            continue
        found.append(Group(name, package, options, default))
    return found


def help_template(conf_dirs: list[Path], config_name: str, usage: str, example: str) -> str:
    lines = [usage, "", "== Config groups (group=option; the default first) =="]
    for group in groups(conf_dirs, config_name):
        options = sorted(group.options, key=lambda o: o != group.default)
        if group.default is None:
            options = ["null", *options]
        lines.append(f"  {group.typed}={'|'.join(options)}")
    lines += [
        "",
        f"== Config (override any key: {example}) ==",
        "",
        "$CONFIG",
        "Hydra's own flags: --hydra-help. The composed config alone: --cfg job.",
    ]
    return "\n".join(lines)


def register_help(conf_dirs: list[Path], config_name: str, usage: str, example: str) -> None:
    """`--help` for `config_name`: its yaml selects it with `override hydra/help: <name>`."""
    template = help_template(conf_dirs, config_name, usage, example).replace("${", "\\${")
    node = {"app_name": config_name, "header": "", "footer": "", "template": template}
    ConfigStore.instance().store(group="hydra/help", name=config_name, node=node)


# -- checking overrides -----------------------------------------------------------------------


def _dataclass_of(annotation: Any) -> type | None:
    if is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(annotation) if is_dataclass(a)), None)
    return None


def unknown_key(schema: type, path: list[str], open_fields: dict[str, type | None]) -> str | None:
    """Why `path` is not a key of `schema` (None if it is, or if it lies in a free-form part).
    `open_fields`: fields typed Any whose schema depends on a choice ({'source': <its schema>})."""
    node: type | None = schema
    done: list[str] = []
    for part in path:
        if node is None:
            return None  # a free-form dict below this point (trainer.kwargs)
        names = [f.name for f in fields(node)]
        if part not in names:
            where = ".".join(done) or "the config"
            return f"unknown key {'.'.join([*done, part])} ({where} has: {', '.join(names)})"
        done.append(part)
        hint = typing.get_type_hints(node)[part]
        node = open_fields.get(part) if part in open_fields else _dataclass_of(hint)
    return None


def check_overrides(
    conf_dirs: list[Path],
    config_name: str,
    schema: type,
    overrides: list[str],
    sources: dict[str, type],
) -> str | None:
    """The first problem with `overrides` (a misspelt key or option), or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # a syntax error: Hydra says it best
        return None
    known = {g.name: g for g in groups(conf_dirs, config_name)}
    source_group = next((g for g in known.values() if g.name == "source"), None)
    source = source_group.default if source_group else None
    for o in parsed:
        if o.key_or_group == "source" and not o.is_sweep_override():
            source = o.get_value_element_as_str()
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete():
            continue
        group = known.get(key)
        if group is not None and (o.package is not None or "." not in key):
            try:
                values = (
                    list(o.sweep_string_iterator())
                    if o.is_sweep_override()
                    else [o.get_value_element_as_str()]
                )
            except Exception:  # a glob or interval sweep of options: Hydra expands it
                continue
            for value in values:
                if value not in group.options and value != "null":
                    return (
                        f"{group.typed}={value}: no such option "
                        f"({group.typed} is one of: {', '.join(group.options)})"
                    )
            if group.package and o.package != group.package:
                return f"{o.input_line}: choose it with {group.typed}={values[0]}"
            continue
        problem = unknown_key(schema, key.split("."), {"source": sources.get(source or "")})
        if problem:
            return problem
    return None


def searched(overrides: list[str]) -> list[Path]:
    """The folders a `hydra.searchpath=[...]` override adds (file:// and pkg:// entries): their
    config groups' options exist too."""
    import importlib.resources

    from hydra.core.override_parser.overrides_parser import OverridesParser

    folders: list[Path] = []
    for override in overrides:
        if not override.startswith("hydra.searchpath="):
            continue
        try:
            entries = OverridesParser.create().parse_override(override).value()
        except Exception:  # a syntax error: Hydra says it best
            continue
        for entry in entries if isinstance(entries, list) else [entries]:
            scheme, _, where = str(entry).rpartition("://")
            if scheme == "pkg":
                folders.append(Path(str(importlib.resources.files(where.replace("/", ".")))))
            elif scheme in ("", "file"):
                folders.append(Path(where))
    return folders


def check_command_line(
    conf_dirs: list[Path], config_name: str, schema: type, sources: dict[str, type], argv: list[str]
) -> None:
    """Exit with one line (code 2) if an override names a key or option that does not exist."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    overrides = args.overrides or []
    conf_dirs = [*conf_dirs, *searched(overrides)]
    if args.config_dir:  # --config-dir: a folder Hydra adds to the search path
        conf_dirs.append(Path(args.config_dir))
    problem = check_overrides(conf_dirs, config_name, schema, overrides, sources)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
