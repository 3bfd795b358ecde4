"""What an analysis writes into the run directory: CSV tables and figures (ARCHITECTURE.md, "Runs").

- :func:`output_dir`: the folder of an analysis' files, ``dirpath`` if given, else the trainer's
  ``log_dir`` (the run directory's logger version folder), else ``default_root_dir``.
- :func:`write_csv`: every table of manynets, **comma-separated**, one header row; quantities are
  fractions (never percent) and a column's unit, where it has one, is part of its header
  (``saturation/train/stem (fraction)``, ``receptive_field (px)``); :func:`read_csv` reads such a file
  back with the units stripped from the column names (the resume of ``saturation.csv`` uses it).
- :func:`save_figure`: a matplotlib figure saved as ``<name>.png`` and sent to every logger that takes
  figures (TensorBoard's ``add_figure``; ``log_image`` of W&B-style loggers), then closed.
- Figure conventions shared by every plot: :func:`run_name` (the title names the run),
  :func:`layer_labels` (layer names on an axis: the module path, shortened the same way everywhere) and
  :func:`legend_outside` (a legend right of the axes, never over the data).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

_UNIT = re.compile(r" \([^()]*\)$")
_ELLIPSIS = "\u2026"


def output_dir(trainer: Any, dirpath: str | None = None) -> Path:
    """``dirpath`` or the trainer's ``log_dir`` or its ``default_root_dir``."""
    return Path(dirpath or trainer.log_dir or trainer.default_root_dir)


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], units: Mapping[str, str] | None = None,
              columns: Sequence[str] = ()) -> Path:  # fmt: skip
    """Write ``rows`` (dicts) as a comma-separated table with a header row; returns ``path``.

    The columns are ``columns`` followed by the other keys of the rows in order of first use; missing
    values stay empty. ``units`` maps a column name, or the first ``/``-separated part of it
    (``saturation`` for ``saturation/train/stem``), to a unit appended to its header as `` (unit)``.
    """
    units = units or {}
    columns = list(columns)
    for row in rows:
        columns += [k for k in row if k not in columns]

    def header(column: str) -> str:
        unit = units.get(column, units.get(column.split("/")[0]))
        return f"{column} ({unit})" if unit else column

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([header(c) for c in columns])
        writer.writerows([row.get(c, "") for c in columns] for row in rows)
    return path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a file written by :func:`write_csv`, keyed by the column names without their units."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [_UNIT.sub("", name) for name in next(reader, [])]
        return [dict(zip(header, values)) for values in reader]


def save_figure(trainer: Any, fig: Any, directory: str | Path, name: str, tag: str | None = None,
                dpi: int = 100) -> Path:  # fmt: skip
    """Save ``fig`` as ``directory/name.png``, log it under ``tag`` (default ``name``) at the trainer's
    global step to every logger that takes figures, and close it. Returns the PNG's path.

    A logger whose ``log_image`` takes other arguments (it raises ``TypeError``/``ValueError``) is skipped:
    the PNG on disk is the record.
    """
    import matplotlib.pyplot as plt

    path = Path(directory) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    tag, step = tag or name, int(getattr(trainer, "global_step", 0))
    for logger in getattr(trainer, "loggers", None) or []:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure(tag, fig, global_step=step, close=False)
        elif hasattr(logger, "log_image"):
            try:
                logger.log_image(key=tag, images=[fig], step=step)
            except (TypeError, ValueError):
                pass
    plt.close(fig)
    return path


def run_name(trainer: Any = None, directory: str | Path | None = None) -> str:
    """The name a figure's title gives its run: the run directory's name (``trainer.default_root_dir``, or
    ``directory``), e.g. ``digits`` for ``runs/quickstart/digits``; ``""`` when neither is known."""
    root = directory if directory is not None else getattr(trainer, "default_root_dir", None)
    return Path(root).resolve().name if root else ""


def titled(text: str, run: str = "") -> str:
    """``"<run>: <text>"`` (just ``text`` without a run name)."""
    return f"{run}: {text}" if run else text


def layer_label(name: str, max_chars: int = 22, keep: int = 2) -> str:
    """Readable name of a layer on an axis: the module path with dots (``body-0-conv1`` -> ``body.0.conv1``,
    as ``named_modules`` writes it); a path longer than ``max_chars`` keeps its first part and its last
    ``keep`` parts around an ellipsis (``members.0.body.3.block.conv1`` -> ``members.….block.conv1``)."""
    parts = [p for p in re.split(r"[-.]", name) if p]
    path = ".".join(parts)
    if len(path) <= max_chars or len(parts) <= keep + 1:
        return path
    return ".".join([parts[0], _ELLIPSIS, *parts[-keep:]])


def layer_labels(names: Sequence[str], max_chars: int = 22) -> list[str]:
    """:func:`layer_label` of every name; names whose short labels would collide keep more of their path."""
    names = list(names)
    labels = [layer_label(n, max_chars) for n in names]
    for keep in range(3, 1 + max((len(re.split(r"[-.]", n)) for n in names), default=0)):
        repeated = {label for label in labels if labels.count(label) > 1}
        if not repeated:
            break
        labels = [layer_label(n, max_chars, keep) if label in repeated else label for n, label in zip(names, labels)]
    return labels


def legend_outside(ax: Any, title: str | None = None, **kwargs: Any) -> Any:
    """A legend right of ``ax`` (outside the data; ``save_figure`` saves with a tight bounding box)."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False,
                     title=title, **kwargs)  # fmt: skip
