"""Imports inside ``manynets`` point one way (ARCHITECTURE.md, "The one idea"; docs/architecture.md).

Every module of the package is parsed with ``ast`` (no import is executed) and each ``import`` /
``from ... import`` of a ``manynets`` module, at any depth (function-level and TYPE_CHECKING imports
count too; relative imports are resolved), is checked against the levels

    cli (cli, __main__, grid, stacked_configs)   6   (one group)
    lightning_modules, callbacks                 5
    analysis                                     4
    networks, datamodules                        3
    layers                                       2
    cuda_ops                                     1
    errors, metrics, random_state (leaves)       0

Rule: a module may import its own subpackage, any lower level, and the leaves; never a higher level.
Leaves import only leaves; cuda_ops imports nothing of manynets but leaves. ``lightning_modules`` and
``callbacks`` share a level but do not import each other: a callback works with the LightningModule it
is handed (duck-typed: ``network``, ``predict_logits``, a subspace module's ``kind``), so it never needs
a method module, and a method never needs a callback. ``networks`` and ``datamodules`` share a level
and do not import each other either (a backbone knows nothing of data sets). The package
``manynets/__init__.py`` imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "manynets"

LEVELS = {
    "cli": 6,
    "lightning_modules": 5, "callbacks": 5,
    "analysis": 4,
    "networks": 3, "datamodules": 3,
    "layers": 2,
    "cuda_ops": 1,
    "errors": 0, "metrics": 0, "random_state": 0,
}  # fmt: skip
GROUPS = {"__main__": "cli", "grid": "cli", "stacked_configs": "cli", "catalog": "cli", "report": "cli",
          "shipped_configs": "cli"}
"""Top-level modules that belong to a level's group: the command line's entry point and helpers."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every ``manynets`` module or name imported by the file at ``path``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from manynets import errors` imports manynets.errors; `from x import Name` imports x
            found += [(node.lineno, f"{module}.{alias.name}" if module == "manynets" else module) for alias in node.names]
    ours = [(line, target) for line, target in found if target == "manynets" or target.startswith("manynets.")]
    return sorted(set(ours))


def _top(dotted: str) -> str:
    """The group of a dotted manynets name: its subpackage or top-level module (``""``: the package)."""
    parts = dotted.split(".")
    top = parts[1] if len(parts) > 1 else ""
    return GROUPS.get(top, top)


def violations(path: Path) -> list[str]:
    source = _top(_module_name(path))
    out = []
    for line, target in imported_modules(path):
        dest = _top(target)
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        if source == "":
            out.append(f"{where}: the package __init__ imports nothing")
        elif dest == source:
            continue
        elif dest not in LEVELS or source not in LEVELS:
            out.append(f"{where}: {source or dest!r} has no level; add it to LEVELS with a reason")
        elif LEVELS[dest] > LEVELS[source]:
            out.append(f"{where}: {source} (level {LEVELS[source]}) may not import {dest} (level {LEVELS[dest]})")
        elif LEVELS[dest] == LEVELS[source] and LEVELS[source] > 0:
            out.append(f"{where}: {source} and {dest} share level {LEVELS[source]} and do not import each other")
    return out


def test_imports_point_one_way():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50 and any(f.parent.name == "analysis" for f in files)
    problems = [v for f in files for v in violations(f)]
    assert not problems, "imports against the direction cli -> ... -> cuda_ops:\n" + "\n".join(problems)


def test_checker_sees_wrong_way_imports(tmp_path, monkeypatch):
    """The checker itself: a layer importing a callback, a relative import upwards, a same-level import,
    a function-level import and ``from manynets import <leaf>`` are all classified."""
    fake = tmp_path / "manynets"
    for folder in ("layers", "callbacks", "lightning_modules"):
        (fake / folder).mkdir(parents=True)
    (fake / "layers" / "bad.py").write_text(
        "from manynets.callbacks.saturation import Saturation\n"
        "def f():\n    from ..analysis import LayerTap\n"
        "from manynets import errors\nfrom . import covariance\n"
    )
    (fake / "callbacks" / "same.py").write_text("import manynets.lightning_modules.probe\nfrom manynets import metrics\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    bad = violations(fake / "layers" / "bad.py")
    assert [v.split(": ", 1)[0].split(" imports ")[1] for v in bad] == [
        "manynets.callbacks.saturation", "manynets.analysis"
    ]
    assert imported_modules(fake / "layers" / "bad.py")[2:] == [(4, "manynets.errors"), (5, "manynets.layers")]
    same = violations(fake / "callbacks" / "same.py")
    assert len(same) == 1 and "share level 5" in same[0]
