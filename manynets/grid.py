"""``manynets grid --config grid.yaml``: one ``manynets fit`` per combination of list-valued keys.

PHD-LAB (spec pinet_saturation §2.4) expands every list-valued config key into the Cartesian product
of runs. This is the same, thinly on top of the CLI — no scheduler: it prints the commands, or runs
them one after the other (``--run``), skipping finished runs. A grid file::

    configs: [configs/probe/cifar10_vgg_saturation.yaml]   # passed as --config to every run
    root: runs/probe/vgg_grid                               # run folder root/<name>
    grid:                                                   # dotted CLI keys; a list = an axis
      model.init_args.backbone.init_args.depth: [11, 13, 16, 19]
      data.init_args.batch_size: 512                        # scalar: the same for every run
      model.init_args.backbone.init_args.blocks: [[1, 1, 1, 5]]  # a list value: wrap it in a list
    args: ["--trainer.max_epochs=30"]                       # extra arguments for every run

Each run gets ``--trainer.default_root_dir=<root>/<name>`` and ``--checkpoint.dirpath=<root>/<name>/checkpoints``
with ``<name>`` built from the varying keys (e.g. ``depth=11``). A run is finished when
``<root>/<name>/done`` exists (written after it exits with status 0); an unfinished run with a
``checkpoints/last.ckpt`` is resumed with ``--ckpt_path``.

The grid file and its ``configs`` entries may be shipped configs named as ``--config`` takes them
(``manynets grid --config probe/grid_vgg``; ``configs: [probe/cifar10_vgg_probes]``): each run's
``manynets fit`` resolves the names (:func:`manynets.shipped_configs.resolve_config_names`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from manynets.shipped_configs import find_config


def _value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def expand(grid: dict) -> list[dict]:
    """Cartesian product: every list value is an axis, scalars are the same in every combination."""
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"grid must be a non-empty mapping of dotted CLI keys to values, got {grid!r}")
    axes = [(k, v if isinstance(v, list) else [v]) for k, v in grid.items()]
    for key, values in axes:
        if not values:
            raise ValueError(f"grid key {key!r} has an empty list; give at least one value")
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def run_name(combo: dict, grid: dict) -> str:
    """``key=value`` of the keys with more than one value (last dotted part), joined by ``-``."""
    varying = [k for k, v in grid.items() if isinstance(v, list) and len(v) > 1]
    parts = [f"{k.rsplit('.', 1)[-1]}={_value(combo[k])}" for k in varying] or ["run"]
    return re.sub(r"[^A-Za-z0-9=._,+-]", "_", "-".join(parts))


def commands(spec: dict) -> list[tuple[Path, list[str]]]:
    """(run folder, ``fit`` arguments) per combination."""
    configs = spec.get("configs") or []
    if isinstance(configs, str):
        configs = [configs]
    root = Path(spec.get("root", "runs/grid"))
    extra = [str(a) for a in spec.get("args") or []]
    grid = spec.get("grid")
    out = []
    for combo in expand(grid):
        run_dir = root / run_name(combo, grid)
        args = ["fit"] + [x for c in configs for x in ("--config", str(c))]
        args += [f"--{k}={_value(v)}" for k, v in combo.items()] + extra
        args += [f"--trainer.default_root_dir={run_dir}", f"--checkpoint.dirpath={run_dir / 'checkpoints'}"]
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            args.append(f"--ckpt_path={last}")
        out.append((run_dir, args))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="manynets grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="grid YAML (configs, root, grid, args)")
    parser.add_argument("--run", action="store_true", help="run the commands one after the other (default: print)")
    parser.add_argument("--stop-on-error", action="store_true", help="stop at the first failing run")
    ns = parser.parse_args(argv)
    path = find_config(ns.config) or Path(ns.config)
    if not path.is_file():
        print(f"manynets grid: error: grid file '{path}' not found", file=sys.stderr)
        return 2
    spec = yaml.safe_load(path.read_text()) or {}
    try:
        runs = commands(spec)
    except ValueError as err:
        print(f"manynets grid: error: {err} (in '{path}')", file=sys.stderr)
        return 2
    failed = 0
    for run_dir, args in runs:
        done = run_dir / "done"
        if done.is_file():
            print(f"# done, skipped: {run_dir}")
            continue
        print("manynets " + " ".join(shlex.quote(a) for a in args), flush=True)
        if not ns.run:
            continue
        rc = subprocess.call([sys.executable, "-m", "manynets", *args])
        if rc == 0:
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text("finished\n")
        else:
            failed += 1
            print(f"# failed with status {rc}: {run_dir}", file=sys.stderr)
            if ns.stop_on_error:
                return rc
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
