"""Stacked ``--config`` files: a later class replaces an earlier one wholesale, its options included.

jsonargparse merges stacked configs key by key, and when a later source changes a ``class_path`` it
keeps every earlier ``init_args`` value the new class also accepts. For manynets that is a trap:
``--config mixmo_digits.yaml --config digits.yaml`` builds the plain classifier with MixMo's backbone
options (``stride_on``, ``init: mixmo``) without a word. The rule here: when a later ``--config`` or
command-line option sets ``model.class_path`` (or the backbone's ``class_path``) to another class,
the ``model`` (or backbone) options of the earlier config files are dropped, so the new class starts
from its own defaults plus what the later sources give; a note on stderr names what was reset.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from manynets.errors import ConfigError

_MODEL = ("model",)
_BACKBONE = ("model", "init_args", "backbone")


def _name(class_path: Any) -> str | None:
    return class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) else None


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _option_class(arg: str, value: str | None, group: tuple[str, ...]) -> str | None:
    """The class an option such as ``--model=X`` / ``--model.class_path=X`` sets for ``group``, if any."""
    key = ".".join(group)
    for form in (f"--{key}", f"--{key}.class_path"):
        if arg == form and value is not None and not value.lstrip().startswith("{"):
            return _name(value)
        if arg.startswith(form + "=") and not arg.split("=", 1)[1].lstrip().startswith("{"):
            return _name(arg.split("=", 1)[1])
    return None


def check_config_files(argv: list[str]) -> None:
    """Every ``--config`` file is readable, valid YAML and a mapping of config groups; else name the file."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.split("=", 1)[1] if arg.startswith(
            "--config=") else None
        if path is None or "\n" in path or path.lstrip().startswith("{"):
            continue  # not a file (an inline YAML/JSON string is parsed by jsonargparse)
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"--config '{path}': no such file. Give the path of a YAML config, e.g. "
                              "configs/quickstart/digits.yaml.")
        try:
            loaded = yaml.safe_load(file.read_text())
        except OSError as err:
            raise ConfigError(f"--config '{path}' cannot be read ({err.strerror or err}).") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"--config '{path}' is not valid YAML ({getattr(err, 'problem', None) or err}{where}).") from None
        if not isinstance(loaded, dict) or not loaded:
            what = "empty" if loaded is None or loaded == {} else f"a YAML {type(loaded).__name__}, not a mapping"
            raise ConfigError(f"--config '{path}' is {what}: a config maps groups (model, data, trainer, "
                              "checkpoint, seed_everything) to their options, see configs/quickstart/digits.yaml.")


def reset_replaced_classes(argv: list[str]) -> list[str]:
    """``argv`` with the earlier configs' options of a replaced model or backbone class removed."""
    sources: list[tuple[int, dict | None, str]] = []  # (position in argv, config or None for an option, label)
    i = 0
    while i < len(argv):
        arg = argv[i]
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is not None and Path(path).is_file():
            try:
                loaded = yaml.safe_load(Path(path).read_text())
            except yaml.YAMLError:
                loaded = None  # the CLI reports the broken file itself
            sources.append((i, loaded if isinstance(loaded, dict) else {}, path))
        elif arg.startswith("--model"):
            sources.append((i, None, arg))
        i += 1

    out = list(argv)
    current = {_MODEL: None, _BACKBONE: None}
    for k, (pos, cfg, label) in enumerate(sources):
        for group in (_MODEL, _BACKBONE):
            if cfg is not None:
                new = _name(_get(cfg, group + ("class_path",)))
            else:
                nxt = argv[pos + 1] if pos + 1 < len(argv) else None
                new = _option_class(argv[pos], nxt, group)
            if new is None:
                continue
            if current[group] is not None and new != current[group]:
                _drop_from_earlier(out, sources[:k], group, current[group], new, label)
            current[group] = new
            if group == _MODEL:
                current[_BACKBONE] = _name(_get(cfg, _BACKBONE + ("class_path",))) if cfg is not None else None
    return out


def _drop_from_earlier(out: list[str], earlier, group, old: str, new: str, where: str) -> None:
    for pos, cfg, _ in earlier:
        if not cfg:
            continue
        parent = _get(cfg, group[:-1]) if len(group) > 1 else cfg
        if isinstance(parent, dict) and group[-1] in parent:
            del parent[group[-1]]
            if out[pos] == "--config":
                out[pos + 1] = yaml.safe_dump(cfg, sort_keys=False)
            else:
                out[pos] = "--config=" + yaml.safe_dump(cfg, sort_keys=False)
    print(
        f"manynets: note: {where} replaces {'.'.join(group)} class {old} by {new}; the {old} options of the "
        f"earlier config files are dropped (options never carry over between classes).",
        file=sys.stderr,
    )
