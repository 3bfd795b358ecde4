"""The configs shipped inside the package (``manynets/configs/``): found by name, and their metadata.

``--config quickstart/digits`` (or ``quickstart/digits.yaml``) names the shipped
``manynets/configs/quickstart/digits.yaml`` when no such file exists relative to the current directory, so
an installed wheel runs every shipped config without a clone. A config's header comment carries its
metadata: the first comment line is its one-line description, and each line

    # published: {metric: test/acc, value: 0.615, source: "Yang et al. ICLR 2022, Table 1"}

records a published number (a YAML flow mapping; ``metric`` names the logged metric it compares to).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from manynets.errors import ConfigError

PUBLISHED_PREFIX = "# published:"


def config_root() -> Path:
    """The directory of the shipped configs (inside the installed package)."""
    return Path(str(resources.files("manynets") / "configs"))


def shipped_configs() -> list[Path]:
    """Every shipped config file, sorted by its name (``group/name.yaml``)."""
    root = config_root()
    return sorted(root.rglob("*.yaml"), key=lambda p: p.relative_to(root).as_posix())


def config_name(path: str | Path) -> str:
    """``manynets/configs/quickstart/digits.yaml`` -> ``quickstart/digits``."""
    path = Path(path)
    try:
        return path.resolve().relative_to(config_root().resolve()).with_suffix("").as_posix()
    except ValueError:
        return path.with_suffix("").name


def find_config(name: str) -> Path | None:
    """The file ``name`` refers to: an existing path, else a shipped config by name (suffix optional)."""
    if Path(name).is_file():
        return Path(name)
    relative = name.removeprefix("configs/")
    for candidate in (relative, relative + ".yaml"):
        path = config_root() / candidate
        if path.is_file():
            return path
    return None


def resolve_config_names(argv: list[str]) -> list[str]:
    """Replace every ``--config NAME`` that is not a file by the shipped config of that name.

    An argument that is neither a file nor a shipped name is left alone (the config check reports it);
    inline YAML (``--config '{...}'``) is never touched.
    """
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            index, value, form = i + 1, out[i + 1], "{}"
        elif arg.startswith("--config="):
            index, value, form = i, arg.split("=", 1)[1], "--config={}"
        else:
            continue
        if "\n" in value or value.lstrip().startswith("{") or Path(value).is_file():
            continue
        found = find_config(value)
        if found is not None:
            out[index] = form.format(found)
    return out


def config_metadata(path: str | Path) -> dict[str, Any]:
    """``{"name", "description", "published": [{"metric", "value", "source"}, ...]}`` from a config's header."""
    path = Path(path)
    header: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    description = next((line.lstrip("# ").strip() for line in header if line.lstrip("# ").strip()), "")
    published = []
    for line in header:
        if not line.startswith(PUBLISHED_PREFIX):
            continue
        try:
            entry = yaml.safe_load(line[len(PUBLISHED_PREFIX):])
            entry = {"metric": str(entry["metric"]), "value": float(entry["value"]),
                     "source": str(entry.get("source", ""))}
        except (yaml.YAMLError, KeyError, TypeError, ValueError):
            raise ConfigError(
                f"{path}: the line '{line.strip()}' is not a published-number record. Write it as "
                "'# published: {metric: test/acc, value: 0.9, source: \"paper, table\"}'."
            ) from None
        published.append(entry)
    return {"name": config_name(path), "description": description, "published": published}
