"""Load a config: defaults <- ``_BASE_`` chain of YAML files <- command-line ``KEY VALUE`` pairs.

Merging is yacs'; this module resolves ``_BASE_`` files (relative paths, any depth, cycles
detected) and turns every mistake into one error that names the file, the key and what was expected.
"""

from __future__ import annotations

import ast
import difflib
import os
from collections.abc import Sequence
from pathlib import Path

import yaml
from yacs.config import CfgNode as CN

from retrieval.config.defaults import CHOICES, get_cfg

BASE_KEY = "_BASE_"


class ConfigError(ValueError):
    """A config file or override is invalid; the message says where and what was expected."""


def _full_keys(node: CN, prefix: str = "") -> list[str]:
    """Every leaf key of ``node`` as a dotted path."""
    keys = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        keys.extend(_full_keys(value, path + ".") if isinstance(value, CN) else [path])
    return keys


def _unknown_key_error(path: str, source: str, defaults: CN) -> ConfigError:
    """Error naming an unknown key and the closest valid ones."""
    close = difflib.get_close_matches(path, _full_keys(defaults), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"{source}: unknown config key {path!r}{hint}")


def _check_against_defaults(values: dict, defaults: CN, source: str, prefix: str = "") -> dict:
    """Reject unknown keys and sub-trees given a scalar; widen ints where the default is a float."""
    checked = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in defaults:
            raise _unknown_key_error(path, source, get_cfg())
        default = defaults[key]
        if isinstance(default, CN):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{source}: {path!r} is a section; expected a mapping, got {value!r}"
                )
            value = _check_against_defaults(value, default, source, path + ".")
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        checked[key] = value
    return checked


def _merge(cfg: CN, values: dict, source: str) -> None:
    """Merge a checked mapping into ``cfg`` with yacs, re-raising type errors with their source."""
    try:
        cfg.merge_from_other_cfg(CN(_check_against_defaults(values, cfg, source)))
    except (KeyError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source}: {err}") from None
    validate_choices(cfg, source)


def _read_yaml(path: Path) -> dict:
    """Parse one YAML file into a mapping (empty file = {})."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _yaml_chain(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The files to merge, most basic first, following ``_BASE_`` relative to each file."""
    path = path.resolve()
    if path in stack:
        cycle = " -> ".join(str(p) for p in stack + (path,))
        raise ConfigError(f"_BASE_ cycle: {cycle}")
    data = _read_yaml(path)
    base = data.pop(BASE_KEY, None)
    bases = [] if base is None else [base] if isinstance(base, str) else list(base)
    chain = []
    for base_path in bases:
        resolved = Path(os.path.expanduser(base_path))
        resolved = resolved if resolved.is_absolute() else path.parent / resolved
        if not resolved.is_file():
            raise ConfigError(f"{path}: _BASE_ file {str(resolved)!r} does not exist")
        chain.extend(_yaml_chain(resolved, stack + (path,)))
    return chain + [(path, data)]


def _parse_value(text: str):
    """Literal value of a command-line override (numbers, lists, bools); plain string otherwise."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def overrides_to_dict(opts: Sequence[str]) -> dict:
    """['A.B', '1', 'C', 'x'] -> {'A': {'B': 1}, 'C': 'x'}."""
    if len(opts) % 2:
        raise ConfigError(
            f"command-line overrides must be KEY VALUE pairs, got an odd list: {list(opts)}"
        )
    nested: dict = {}
    for key, text in zip(opts[0::2], opts[1::2]):
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _parse_value(text)
    return nested


def validate_choices(cfg: CN, source: str = "config") -> None:
    """Every implementation-naming key holds one of its allowed values."""
    for path, allowed in CHOICES.items():
        node = cfg
        for part in path.split("."):
            node = node[part]
        if node not in allowed:
            raise ConfigError(
                f"{source}: {path} = {node!r} is not allowed; allowed values: {list(allowed)}"
            )


def load_cfg(
    config_files: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    opts: Sequence[str] = (),
) -> CN:
    """Defaults, then the YAML chain of each config file in order, then ``opts``; validated and
    frozen.

    Several files compose, e.g. a paper-table row followed by configs/demo/scale.yaml to shrink it.
    """
    cfg = get_cfg()
    if isinstance(config_files, (str, os.PathLike)):
        config_files = [config_files]
    for config_file in config_files or ():
        for path, data in _yaml_chain(Path(config_file)):
            _merge(cfg, data, str(path))
    _merge(cfg, overrides_to_dict(opts), "command line")
    cfg.freeze()
    return cfg


def cfg_from_dump(text: str) -> CN:
    """Rebuild a frozen config from a YAML dump (as stored in checkpoints), checked against the
    defaults.
    """
    cfg = get_cfg()
    _merge(cfg, yaml.safe_load(text) or {}, "stored config")
    cfg.freeze()
    return cfg


def save_cfg(cfg: CN, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(cfg.dump())
    os.replace(tmp, path)
