"""``manynets report RUN_DIR...``: finished runs as one table (Markdown on stdout; CSV and figures with ``--out``).

A run directory (``trainer.default_root_dir``) holds ``results.json``, written by the CLI after every
test::

    {"config": [paths], "ckpt_path": str, "model": class_path, "backbone": class_path | null,
     "data": class_path, "epochs": int, "global_step": int, "metrics": {"test/acc": 0.97, ...}, "finished": iso}

and the tables the callbacks leave in it (anywhere below it, the newest of each name):
``subspace_sweep.csv`` (:class:`~manynets.callbacks.SubspaceSweep`), ``saturation.csv``
(:class:`~manynets.callbacks.Saturation`), ``probes.csv`` (:class:`~manynets.lightning_modules.ProbeModule`),
``reliability.csv`` (:class:`~manynets.callbacks.ReliabilityDiagram`) and ``pca_sweep.csv``.

One row per run: run, config, method, backbone, data, epochs, every ``test/...`` metric (the default
prediction's ``test/{acc,nll,ece,brier}``; per-n ``test/n{n}/...``, per-member ``test/member{k}/acc``,
temperature-scaled ``test/ts/...``, per test set ``test/{set}/...``), the subspace sweep's points
(``sweep/alpha{a}/...``, ``sweep/{point}/...``), and the published number of the run's config
(``# published:`` header lines, :func:`manynets.shipped_configs.config_metadata`) with the difference
measured - published. With ``--out DIR``: ``report.csv`` (all columns; comma-separated, fractions, units
in the header) and the figures

- ``accuracy_vs_n.png``: test accuracy against images per pass n (superposition runs);
- ``ensemble_vs_members.png``: ensemble against member accuracies (MixMo, ensembles, ...);
- ``<run>_subspace_sweep.png`` / ``<run>_subspace_diversity.png`` / ``<run>_subspace_simplex.png``:
  accuracy, NLL and ECE against alpha (subspaces);
- ``<run>_saturation_heatmap.png``: saturation per epoch and layer;
- ``<run>_probes.png``: probe accuracy per layer;
- ``<run>_reliability.png``: reliability diagram of the test set;
- ``<run>_pca_sweep.png``: accuracy with PCA projections against 1 - delta
  (:class:`~manynets.callbacks.PCADeltaSweep`).
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from manynets.analysis.outputs import legend_outside, read_csv, save_figure, write_csv
from manynets.errors import ConfigError, ManynetsError
from manynets.shipped_configs import config_metadata, config_name, find_config

RESULTS = "results.json"
REQUIRED = ("config", "model", "data", "metrics")
CORE = ("acc", "nll", "ece", "brier")
UNITS = {"acc": "fraction", "ece": "fraction", "nll": "nats", "images_per_s": "images/s", "published": "fraction",
         "difference": "fraction", "ens_disagreement": "fraction"}  # fmt: skip
MARKDOWN_ALPHAS = (0.0, 0.5, 1.0)
"""Points of a line / curve sweep shown in the Markdown table (report.csv has every alpha)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors in the manynets form, exit 2
        self.print_usage(sys.stderr)
        print(f"manynets: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="manynets report",
        description="One table of finished runs: Markdown on stdout; a CSV and figures with --out. A run directory "
        f"is a trainer.default_root_dir holding {RESULTS} (written by `manynets test`).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories or globs (quote them: 'runs/quickstart/*'); a directory without "
                        f"{RESULTS} stands for every run below it")  # fmt: skip
    parser.add_argument("--out", metavar="DIR", help="write report.csv and the figures (PNG) into DIR")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of ``manynets report``; returns the exit status (2 for bad input)."""
    args = _parser().parse_args(argv)
    try:
        runs = find_runs(args.runs)
        rows = [run_row(run, load_results(run)) for run in runs]
        _unique_names(rows)
        print(markdown(rows))
        if args.out:
            out = Path(args.out)
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"--out '{out}' cannot be created ({err.strerror or err}). Give a directory you "
                                  "can write to.") from None
            path = write_report_csv(rows, out / "report.csv")
            figures = write_figures(rows, out)
            print(f"\nWrote {path} and {len(figures)} figure(s): {', '.join(p.name for p in figures) or 'none'}")
    except ManynetsError as err:
        print(f"manynets: error: {err}", file=sys.stderr)
        return 2
    return 0


# -- runs and their results ----------------------------------------------------------------
def find_runs(patterns: Sequence[str]) -> list[Path]:
    """Run directories (holding ``results.json``) named by ``patterns``: directories, ``results.json`` files,
    globs, or directories above runs. Raises :class:`ConfigError` for a pattern that names no run."""
    runs: list[Path] = []
    for pattern in patterns:
        paths = [Path(p) for p in sorted(glob.glob(pattern))] if glob.has_magic(pattern) else [Path(pattern)]
        found: list[Path] = []
        for path in paths:
            if path.is_file() and path.name == RESULTS:
                found.append(path.parent)
            elif (path / RESULTS).is_file():
                found.append(path)
            elif path.is_dir():
                found += sorted(p.parent for p in path.rglob(RESULTS))
        if not found:
            what = "matches nothing" if not paths or not any(p.exists() for p in paths) else f"holds no {RESULTS}"
            raise ConfigError(
                f"'{pattern}' {what}: a run directory is the trainer.default_root_dir of a run, with the {RESULTS} "
                "that `manynets test` writes. Test the run first (manynets test --config <config> --ckpt_path "
                "<run dir>/checkpoints/last.ckpt) or give the run directory."
            )
        runs += found
    return list(dict.fromkeys(p.resolve() for p in runs))


def load_results(run: Path) -> dict[str, Any]:
    """``results.json`` of ``run``, checked for the keys the report needs."""
    path = run / RESULTS
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} cannot be read as JSON ({err}). Re-run `manynets test` for this run.") from None
    missing = [k for k in REQUIRED if k not in results] if isinstance(results, dict) else list(REQUIRED)
    if missing:
        raise ConfigError(f"{path} lacks {missing}; it was not written by `manynets test`. Re-run the test.")
    return results


def _short(class_path: str | None) -> str:
    return str(class_path).rsplit(".", 1)[-1] if class_path else ""


def _config_files(paths: Sequence[str]) -> list[Path]:
    files = []
    for path in paths:
        found = Path(path) if Path(path).is_file() else find_config(config_name(path))
        if found is not None:
            files.append(found)
    return files


def newest(run: Path, name: str) -> Path | None:
    """The newest file called ``name`` below ``run`` (callbacks write into the logger's version folder)."""
    matches = [p for p in run.rglob(name) if p.is_file()]
    return max(matches, key=lambda p: p.stat().st_mtime) if matches else None


def run_row(run: Path, results: dict[str, Any]) -> dict[str, Any]:
    """The report's row of one run (see the module doc); keys starting with ``_`` carry data for figures."""
    configs = [str(c) for c in (results.get("config") or [])]
    row: dict[str, Any] = {
        "run": run.name,
        "config": " + ".join(config_name(c) for c in configs),
        "method": _short(results.get("model")),
        "backbone": _short(results.get("backbone")),
        "data": _short(results.get("data")),
        "epochs": results.get("epochs", ""),
        "global_step": results.get("global_step", ""),
        "finished": results.get("finished", ""),
        "run_dir": str(run),
    }
    metrics = {k: float(v) for k, v in results["metrics"].items() if isinstance(v, (int, float))}
    published = [p for f in _config_files(configs) for p in config_metadata(f)["published"]]
    row.update({k: v for k, v in metrics.items() if k.startswith("test/") or any(p["metric"] == k for p in published)})
    if published:
        first = published[0]
        measured = metrics.get(first["metric"])
        row.update({"published_metric": first["metric"], "published": first["value"],
                    "published_source": first["source"],
                    "difference": "" if measured is None else measured - first["value"]})  # fmt: skip
    sweep = newest(run, "subspace_sweep.csv")
    row["_sweep"] = read_csv(sweep) if sweep else []
    for point in row["_sweep"]:
        name = f"alpha{float(point['alpha']):g}" if point.get("alpha") not in (None, "") else point["point"]
        for metric in CORE:
            if point.get(metric, "") != "":
                row[f"sweep/{name}/{metric}"] = float(point[metric])
    row["_kind"] = _subspace_kind(run)
    for name in ("saturation", "probes", "reliability", "pca_sweep"):
        path = newest(run, f"{name}.csv")
        row[f"_{name}"] = read_csv(path) if path else []
    return row


def _subspace_kind(run: Path) -> str:
    """``model.init_args.kind`` from the run's saved ``config.yaml`` (``""`` if none)."""
    import yaml

    path = newest(run, "config.yaml")
    try:
        config = yaml.safe_load(path.read_text()) if path else {}
        return str(((config.get("model") or {}).get("init_args") or {}).get("kind") or "")
    except (yaml.YAMLError, AttributeError, OSError):
        return ""


def _unique_names(rows: list[dict[str, Any]]) -> None:
    """Runs of the same directory name get the parent's name in front (figure files must not collide)."""
    names = [r["run"] for r in rows]
    for row in rows:
        if names.count(row["run"]) > 1:
            row["run"] = f"{Path(row['run_dir']).parent.name}_{row['run']}"


# -- the table -----------------------------------------------------------------------------
def _metric_keys(row: dict[str, Any]) -> list[str]:
    return [k for k in row if k.startswith(("test/", "sweep/"))]


def _split(key: str) -> tuple[str, str]:
    """``test/n2/acc`` -> (``n2``, ``acc``); ``test/acc`` -> (``""``, ``acc``); ``sweep/alpha0.5/acc`` ->
    (``α=0.5``, ``acc``)."""
    head, _, metric = key.rpartition("/")
    group, _, variant = head.partition("/")
    if group == "sweep" and variant.startswith("alpha"):
        variant = f"α={variant.removeprefix('alpha')}"
    return variant, metric


def _ordered(metrics: Sequence[str]) -> list[str]:
    return [m for m in CORE if m in metrics] + sorted(m for m in set(metrics) if m not in CORE)


def report_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Columns of ``report.csv``: the run's description, the published comparison, then every metric."""
    head = ["run", "config", "method", "backbone", "data", "epochs", "global_step", "test/acc", "test/nll",
            "test/ece", "test/brier", "published_metric", "published", "difference", "published_source"]  # fmt: skip
    keys = list(dict.fromkeys(k for row in rows for k in _metric_keys(row) if k not in head))
    keys.sort(key=lambda k: (k.startswith("sweep/"), _split(k)[0], CORE.index(_split(k)[1]) if _split(k)[1] in CORE else 9, k))
    return head + keys + ["finished", "run_dir"]


def write_report_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    columns = report_columns(rows)
    units = {c: UNITS[_split(c)[1]] for c in columns if _split(c)[1] in UNITS}
    units.update({c: UNITS[c] for c in columns if c in UNITS})
    table = [{c: row.get(c, "") for c in columns} for row in rows]
    return write_csv(path, table, units, columns)


def _fmt(value: Any, signed: bool = False) -> str:
    if value in (None, ""):
        return ""
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    return str(value)


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in body]
    return "\n".join(lines)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown report: one row per run, then the further variants (per n, member, ts, alpha, ...)."""
    header = ["run", "config", "method", "backbone", "data", "epochs", "acc", "nll", "ece", "brier", "published",
              "difference"]  # fmt: skip
    body = []
    for row in rows:
        published = ""
        if row.get("published", "") != "":
            published = _fmt(row["published"]) + ("" if row["published_metric"] == "test/acc" else f" ({row['published_metric']})")
        body.append([row["run"], row["config"], row["method"], row["backbone"], row["data"], _fmt(row["epochs"]),
                     *(_fmt(row.get(f"test/{m}")) for m in CORE), published, _fmt(row.get("difference"), signed=True)])  # fmt: skip
    text = _table(header, body)
    variants: list[tuple[str, str, dict[str, float]]] = []
    for row in rows:
        groups: dict[str, dict[str, float]] = {}
        for key in _metric_keys(row):
            variant, metric = _split(key)
            if not variant and metric in CORE:
                continue
            if key.startswith("sweep/alpha") and float(variant[2:]) not in MARKDOWN_ALPHAS:
                continue
            groups.setdefault(variant or "(default)", {})[metric] = row[key]
        variants += [(row["run"], name, values) for name, values in groups.items()]
    if variants:
        metrics = _ordered([m for _, _, values in variants for m in values])
        body = [[run, name, *(_fmt(values.get(m)) for m in metrics)] for run, name, values in variants]
        text += "\n\nFurther test metrics (per n, member, temperature-scaled ts, test set, subspace point; all α in " \
                "report.csv):\n\n" + _table(["run", "variant", *metrics], body)
    return text


# -- figures -------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _runs_title(rows: Sequence[dict[str, Any]]) -> str:
    names = [r["run"] for r in rows]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def accuracy_vs_n_figure(rows: Sequence[dict[str, Any]]):
    """Test accuracy against n (images superposed per pass), one line per superposition run; None if none."""
    series = []
    for row in rows:
        points = sorted((int(m.group(1)), row[k]) for k in row if (m := re.fullmatch(r"test/n(\d+)/acc", k)))
        if points:
            series.append((row["run"], points))
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for name, points in series:
        ax.plot([n for n, _ in points], [a for _, a in points], "o-", label=name)
    ax.set_xticks(sorted({n for _, points in series for n, _ in points}))
    ax.set_xlabel("n: images superposed per forward pass")
    ax.set_ylabel("test accuracy (fraction)")
    ax.set_title(f"Superposition: test accuracy vs n ({_runs_title([r for r in rows if any(s[0] == r['run'] for s in series)])})")
    ax.grid(alpha=0.3)
    legend_outside(ax, title="run")
    fig.tight_layout()
    return fig


def ensemble_vs_members_figure(rows: Sequence[dict[str, Any]]):
    """Grouped bars per ensemble run: each member's and the ensemble's test accuracy; None if no run has members."""
    runs = []
    for row in rows:
        members = sorted((int(m.group(1)), row[k]) for k in row if (m := re.fullmatch(r"test/member(\d+)/acc", k)))
        if members and row.get("test/acc", "") != "":
            runs.append((row["run"], members, row["test/acc"]))
    if not runs:
        return None
    plt = _pyplot()
    most = max(len(m) for _, m, _ in runs)
    width = 0.8 / (most + 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(runs) + 5), 4))
    for k in range(most):
        xs = [i + (k - most / 2) * width for i, (_, m, _) in enumerate(runs) if k < len(m)]
        ax.bar(xs, [m[k][1] for _, m, _ in runs if k < len(m)], width, label=f"member {k}")
    ax.bar([i + most / 2 * width for i in range(len(runs))], [e for _, _, e in runs], width, color="black",
           label="ensemble (mean logits)")  # fmt: skip
    ax.set_xticks(range(len(runs)), [name for name, _, _ in runs], rotation=20, ha="right")
    low = min(min(a for _, a in m) for _, m, _ in runs)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xlabel("run")
    ax.set_ylabel("test accuracy (fraction)")
    ax.set_title(f"Ensemble vs its members ({_runs_title([r for r in rows if any(x[0] == r['run'] for x in runs)])})")
    ax.grid(alpha=0.3, axis="y")
    legend_outside(ax)
    fig.tight_layout()
    return fig


def run_figures(row: dict[str, Any]) -> dict[str, Any]:
    """``{file name: Figure}`` of one run from its CSVs (subspace sweep, saturation, probes, reliability)."""
    from manynets.analysis.pca import plot_delta_sweep
    from manynets.analysis.probes import plot_probes
    from manynets.analysis.reliability import plot_reliability
    from manynets.analysis.saturation import plot_saturation_heatmap
    from manynets.analysis.subspace_plots import sweep_figures
    from manynets.analysis.outputs import titled

    run, figures = row["run"], {}
    if row["_sweep"]:
        lines = any(r.get("alpha", "") != "" for r in row["_sweep"])
        kind = row["_kind"] or ("line" if lines else "simplex")
        figures.update({f"{run}_{n}": f for n, f in sweep_figures(row["_sweep"], kind, run).items()})
    if row["_saturation"]:
        fig = plot_saturation_heatmap(row["_saturation"], titled("saturation per epoch and layer", run))
        if fig is not None:
            figures[f"{run}_saturation_heatmap"] = fig
    if row["_probes"]:
        results = {r["layer"]: {k: v for k, v in r.items() if k != "layer"} for r in row["_probes"]}
        figures[f"{run}_probes"] = plot_probes(results, titled("linear probe accuracy per layer", run))
    if row["_reliability"]:
        figures[f"{run}_reliability"] = plot_reliability(row["_reliability"], titled("reliability diagram, test set", run))
    if row["_pca_sweep"]:
        figures[f"{run}_pca_sweep"] = plot_delta_sweep(row["_pca_sweep"], titled("PCA projection sweep", run))
    return figures


def report_figures(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every figure of the report, ``{file name without .png: Figure}`` (not saved)."""
    figures = {}
    for name, build in (("accuracy_vs_n", accuracy_vs_n_figure), ("ensemble_vs_members", ensemble_vs_members_figure)):
        fig = build(rows)
        if fig is not None:
            figures[name] = fig
    for row in rows:
        figures.update(run_figures(row))
    return figures


def write_figures(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    return [save_figure(None, fig, out, name) for name, fig in report_figures(rows).items()]
