"""Reading a run configuration: YAML files and ``--section.key value`` overrides, both through one
jsonargparse parser derived from the dataclasses of :mod:`jeidnn.config.schema`.

Every field is an option documented by the docstring under it (``python train.py --help``). Values are
read as YAML but keep a YAML type only where the field's type asks for it: ``--name 2024`` is the string
"2024" and ``--data.labels '[no, yes]'`` two strings, while ``--model.exit_layers '[2, 4]'`` is a list of
ints and ``--jeidnn.lambdas null`` is None. Unknown keys and wrong types raise JeidnnError naming the key.

Two ways in: :func:`load_config` (a YAML file and overrides) and :func:`config_from_dict` (nested dicts);
both end in :func:`jeidnn.config.validate.validate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.resources
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentParser, Namespace, set_loader, set_parsing_settings

from jeidnn.config.schema import RunConfig
from jeidnn.config.validate import validate
from jeidnn.errors import JeidnnError, first_line


def packaged_config(name: str = "default.yaml") -> Path:
    """A config shipped with jeidnn: `configs/` of the repository, packaged as `jeidnn.configs` in a wheel."""
    try:
        folder = importlib.resources.files("jeidnn.configs")
    except ModuleNotFoundError:  # a source checkout that was never installed
        folder = Path(__file__).resolve().parents[2] / "configs"
    return Path(str(folder.joinpath(name)))


# --------------------------------------------------------------------------- YAML


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true / false are booleans (`[no, yes]` stays two strings), no dates, and
    `5e-5` is a float (YAML 1.1 wants a dot)."""


_BOOL, _FLOAT, _DATE = (f"tag:yaml.org,2002:{t}" for t in ("bool", "float", "timestamp"))
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _FLOAT, _DATE)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YamlLoader.add_implicit_resolver(  # after the int resolver, so `5` stays an int
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def read_config_file(path: str | Path) -> dict:
    """The mapping in a YAML config file (empty file = {}); JeidnnError when missing or malformed."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise JeidnnError(f"config file not found: {p}; pass an existing YAML file with --config")
    try:
        data = _yaml_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise JeidnnError(f"config file {p} is not valid YAML ({first_line(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JeidnnError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _list_item_class(tp: Any) -> type | None:
    """GateVariant for `list[GateVariant]`; None for any other type."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _checked(data: Any, cls: type, prefix: str) -> dict:
    """`data` with its keys checked against dataclass `cls`, recursively; `section:` with nothing under it
    (YAML null) counts as an empty section.

    jsonargparse checks the values; it would let an unknown key holding `{}` pass and names list items
    without their index, so keys are checked here.
    """
    if not isinstance(data, dict):
        raise JeidnnError(f"config section `{prefix}` must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    checked = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            where = f"in `{prefix}`" if prefix else "at the top level"
            raise JeidnnError(f"unknown config key `{full}`; valid keys {where}: {', '.join(names)}")
        item = _list_item_class(hints[key])
        if dataclasses.is_dataclass(hints[key]):
            if value is not None:
                checked[key] = _checked(value, hints[key], full)
        elif item is not None and isinstance(value, list):
            checked[key] = [_checked(v, item, f"{full}[{i}]") for i, v in enumerate(value)]
        else:
            checked[key] = value
    return checked


# --------------------------------------------------------------------------- parser


@functools.cache
def _register() -> None:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the docs under each field -> --help
    set_loader("jeidnn", _yaml_load, exceptions=(yaml.YAMLError,))


def config_parser(prog: str = "jeidnn train", description: str | None = None) -> ArgumentParser:
    """A parser with `--config FILE` and one `--section.key` option per field of RunConfig.

    Parse with :func:`parse_config`; add command options (flags) before that.
    """
    _register()
    parser = ArgumentParser(
        prog=prog,
        usage="%(prog)s [-h] [--config FILE] [--SECTION.KEY VALUE ...] [options]",  # not 60 lines of keys
        description=description,
        parser_mode="jeidnn",
        exit_on_error=False,  # parse_config turns errors into one-line JeidnnErrors
        print_config=None,  # the CLI prints RunConfig.to_yaml() itself: the run folder's config.yaml format
        allow_abbrev=False,  # a misspelt key is refused, not matched to the key it starts
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config file; command-line keys win")
    parser.add_class_arguments(RunConfig, None, fail_untyped=True)
    return parser


@functools.cache
def default_parser() -> ArgumentParser:
    return config_parser()


def parse_config(
    parser: ArgumentParser, args: list[str], default_config: Path | None = None
) -> tuple[RunConfig, Namespace]:
    """Dataclass defaults < the `--config` file (else `default_config`) < the other `args`; validated.

    Returns the config and the namespace (for the command's own options).
    """
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--config")
    try:
        path = pre.parse_known_args(args)[0].config or default_config
        data = _checked(read_config_file(path), RunConfig, "") if path is not None else {}
        namespace = parser.parse_args(args, namespace=parser.parse_object(data))
        built = parser.instantiate(namespace)
    except argparse.ArgumentError as exc:
        raise _error(str(exc)) from None
    cfg = RunConfig(**{f.name: built[f.name] for f in dataclasses.fields(RunConfig)})
    validate(cfg)
    return cfg, namespace


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the dataclass defaults when `path` is None) and apply `--key value` overrides.

    Example:
        >>> cfg = load_config("configs/smoke.yaml", ["--data.max_train_samples", "200"])
    """
    config = ["--config", str(path)] if path is not None else []
    return parse_config(default_parser(), [*config, *(overrides or [])])[0]


def config_from_dict(data: dict) -> RunConfig:
    """RunConfig from nested dicts (a loaded YAML file), with the checks of :func:`load_config`."""
    try:
        built = default_parser().instantiate(default_parser().parse_object(_checked(data, RunConfig, "")))
    except argparse.ArgumentError as exc:
        raise _error(str(exc)) from None
    cfg = RunConfig(**{f.name: built[f.name] for f in dataclasses.fields(RunConfig)})
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- errors


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _field_type(dotted: str) -> Any:
    """The annotation of `jeidnn.lr`, or of `im_loss` in `jeidnn.variants.im_loss` (an item's key)."""
    tp: Any = RunConfig
    for part in dotted.split("."):
        tp = _list_item_class(tp) or tp
        if not dataclasses.is_dataclass(tp) or part not in typing.get_type_hints(tp):
            return None
        tp = typing.get_type_hints(tp)[part]
    return tp


def _unknown_key(dotted: str) -> JeidnnError:
    cls: Any = RunConfig
    seen: list[str] = []
    for part in dotted.split("."):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = f"in `{'.'.join(seen)}`" if seen else "at the top level"
            return JeidnnError(f"unknown config key `{dotted}`; valid keys {where}: {', '.join(names)}")
        seen.append(part)
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            break
    return JeidnnError(f"`{'.'.join(seen)}` is not a section; cannot set `{dotted}`")


def _error(message: str) -> JeidnnError:
    """One line naming the key, from a (multi-line) jsonargparse / argparse parse error."""
    keys = list(dict.fromkeys(re.findall(r'Parser key "([^"]+)"', message)))  # a key can repeat
    if m := re.search(r"unrecognized arguments: (\S+)", message):
        arg = m.group(1)
        if arg.startswith("--"):
            return _unknown_key(arg[2:].split("=", 1)[0])
        return JeidnnError(f"unexpected argument {arg!r}; overrides look like --section.key value")
    if m := re.match(r"argument (\S+): expected one argument", message):
        option = m.group(1).split("/")[0]
        return JeidnnError(f"{option} needs a value (write a value that starts with '-' as {option}=VALUE)")
    where = f"config key `{keys[0]}`" if keys else "config"
    if len(keys) > 1:  # a key of one item of a list of sections (jeidnn.variants)
        where = f"config key `{keys[-1]}` of a `{keys[0]}` item"
    if m := re.search(r"[Oo]ption '([^']+)'", message):  # "[Group 'data' does not accept] option 'x'"
        group = re.search(r"Group '([^']+)'", message)
        cls = _list_item_class(_field_type(keys[0])) if keys else None
        if cls is None:
            return _unknown_key(f"{group.group(1)}.{m.group(1)}" if group else m.group(1))
        valid = ", ".join(f.name for f in dataclasses.fields(cls))
        return JeidnnError(f"unknown key `{m.group(1)}` in a `{keys[0]}` item; valid keys: {valid}")
    if m := re.search(r"NestedArg\(key='([^']+)'", message):  # --seed.x: a key under a non-section
        return _unknown_key(f"{keys[0]}.{m.group(1)}" if keys else m.group(1))
    if keys and dataclasses.is_dataclass(_field_type(keys[0])):
        return JeidnnError(
            f"`{keys[0]}` is a section; override its keys (--{keys[0]}.<key> value) or give it a YAML mapping"
        )
    if keys:
        tp = _field_type(".".join(keys))
        value = re.search(r"Given value: (.*)", message) or re.search(r"Got value: (.*)", message)
        got = f", got {value.group(1)[:100]}" if value else ""
        expects = f"expects {_type_name(tp)}" if tp is not None else "is invalid"
        return JeidnnError(f"{where} {expects}{got}; fix the YAML or the --{keys[0]} override")
    return JeidnnError(f"{where}: {first_line(message)}")
