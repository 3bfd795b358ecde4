"""``manynets list [methods|backbones|data|callbacks|configs]``: what manynets ships, one line each.

The classes come from the packages themselves (``__all__`` of ``manynets.lightning_modules``,
``manynets.networks``, ``manynets.datamodules``, the callbacks of ``manynets.callbacks``), each with
the first line of its docstring; a method adds its ``PAPER`` and the range of the published numbers of
its configs. The shipped configs are grouped by the method they build (``model.class_path``), each with
its header's description and published numbers (:func:`manynets.shipped_configs.config_metadata`).
Plain text, at most 100 columns.
"""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import yaml

WIDTH = 100
SECTIONS = ("methods", "backbones", "data", "callbacks", "configs")
USAGE = f"usage: manynets list [{'|'.join(SECTIONS)}] ...   (no section: all of them)"
GRIDS = "grid files (manynets grid --config NAME)"


def main(argv: list[str]) -> int:
    """Print the asked sections (all without arguments); 2 for an unknown section."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + __doc__.split("\n\n")[1].replace("\n", " "))
        return 0
    unknown = [a for a in argv if a not in SECTIONS]
    if unknown:
        print(f"manynets: error: `manynets list` has no section '{unknown[0]}'; choose from "
              f"{', '.join(SECTIONS)}, or give none to list them all.", file=sys.stderr)
        return 2
    blocks = [_SECTION_PRINTERS[name]() for name in (argv or SECTIONS)]
    print("\n\n".join(blocks))
    return 0


# -- the classes -----------------------------------------------------------------------------
def exported_classes(package: ModuleType, base: type) -> list[type]:
    """The classes a package exports (``__all__``, else its public names) that subclass ``base``."""
    names = getattr(package, "__all__", None) or [n for n in dir(package) if not n.startswith("_")]
    found = [getattr(package, name) for name in names]
    return sorted((c for c in found if inspect.isclass(c) and issubclass(c, base)), key=lambda c: c.__name__)


def summary(obj: object) -> str:
    """The first line of the docstring, without reST markup."""
    doc = inspect.getdoc(obj) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    first = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", first)  # :class:`~a.b.C` -> C
    return first.replace("``", "").strip() or "(no description)"


def fit(prefix: str, text: str) -> str:
    """``prefix`` then ``text`` (whitespace collapsed), shortened at a word to :data:`WIDTH` columns."""
    return prefix + textwrap.shorten(text, max(WIDTH - len(prefix), 20), placeholder=" ...")


def _line(name: str, text: str, name_width: int) -> str:
    return fit(f"  {name:<{name_width}}  ", text)


def _class_section(title: str, classes: list[type]) -> str:
    width = max((len(c.__name__) for c in classes), default=0)
    return "\n".join([title] + [_line(c.__name__, summary(c), width) for c in classes])


def _methods() -> list[type]:
    import manynets.lightning_modules as package

    return exported_classes(package, package.ClassifierModule)


def methods_section() -> str:
    classes = _methods()
    published = defaultdict(list)  # method name -> [(config, metric, value)]
    for _, method, meta in _config_records():
        published[method] += [(meta["name"], p["metric"], p["value"]) for p in meta["published"]]
    width = max(len(c.__name__) for c in classes)
    lines = ["methods (model.class_path; `manynets fit --model.help NAME` lists the options)"]
    for cls in classes:
        lines.append(_line(cls.__name__, summary(cls), width))
        indent = width + 6
        lines.append(fit(" " * indent, f"paper: {getattr(cls, 'PAPER', '') or 'none (the plain baseline)'}"))
        lines.append(fit(" " * indent, f"published: {_published_range(published[cls.__name__])}"))
    return "\n".join(lines)


def _published_range(numbers: list[tuple[str, str, float]]) -> str:
    """``test/acc 0.61-0.64 in 3 configs`` per metric, or ``none``."""
    if not numbers:
        return "none"
    by_metric = defaultdict(list)
    for config, metric, value in numbers:
        by_metric[metric].append((config, value))
    parts = []
    for metric, entries in by_metric.items():
        values = [value for _, value in entries]
        low, high = min(values), max(values)
        span = f"{low:.4g}" if low == high else f"{low:.4g}-{high:.4g}"
        configs = len({config for config, _ in entries})
        parts.append(f"{metric} {span} in {configs} config{'s' if configs > 1 else ''}")
    return "; ".join(parts)


def backbones_section() -> str:
    import manynets.networks as package

    classes = [c for c in exported_classes(package, package.Backbone) if c is not package.Backbone]
    return _class_section("backbones (model.init_args.backbone.class_path; num_classes and image_shape come "
                          "from the data)", classes)


def data_section() -> str:
    import manynets.datamodules as package

    classes = [c for c in exported_classes(package, package.ImageDataModule) if c is not package.ImageDataModule]
    return _class_section("data modules (data.class_path; `manynets fit --data.help NAME` lists the options)",
                          classes)


def callbacks_section() -> str:
    import lightning.pytorch as pl

    import manynets.callbacks as package

    return _class_section("callbacks (trainer.callbacks[].class_path)", exported_classes(package, pl.Callback))


# -- the configs -----------------------------------------------------------------------------
def _config_records() -> list[tuple[Path, str, dict]]:
    """(path, group, metadata) per shipped config; group = the short name of the method it builds, or
    :data:`GRIDS` for a ``manynets grid`` file, or ``other``."""
    from manynets.shipped_configs import config_metadata, shipped_configs

    records = []
    for path in shipped_configs():
        try:
            content = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            content = {}
        model = content.get("model") if isinstance(content, dict) else None
        if isinstance(model, dict) and model.get("class_path"):
            group = str(model["class_path"]).rsplit(".", 1)[-1]
        elif isinstance(content, dict) and "grid" in content:
            group = GRIDS
        else:
            group = "other"
        records.append((path, group, config_metadata(path)))
    return records


def configs_section() -> str:
    groups = defaultdict(list)
    for _, group, meta in _config_records():
        groups[group].append(meta)
    order = [c.__name__ for c in _methods()]
    names = sorted(groups, key=lambda g: (order.index(g) if g in order else len(order), g == GRIDS, g))
    lines = ["shipped configs (`manynets fit --config NAME`; files under manynets/configs/)"]
    for group in names:
        lines.append(f"  {group}")
        for meta in sorted(groups[group], key=lambda m: m["name"]):
            lines.append(fit(f"    {meta['name']}  ", meta["description"]))
            for number in meta["published"]:
                source = f" ({number['source']})" if number["source"] else ""
                lines.append(fit(" " * 8, f"published: {number['metric']} = {number['value']:.4g}{source}"))
    return "\n".join(lines)


_SECTION_PRINTERS = {
    "methods": methods_section,
    "backbones": backbones_section,
    "data": data_section,
    "callbacks": callbacks_section,
    "configs": configs_section,
}
