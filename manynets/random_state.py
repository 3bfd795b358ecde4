"""Every global random-number state of a process, in a form ``torch.load(weights_only=True)`` accepts.

Checkpoints carry one entry per rank (:func:`gather`), so a resumed run continues each process's
streams where they stopped: Python's ``random``, NumPy's legacy global generator, torch's CPU
generator and every CUDA device's generator. Generators a module, callback or data module owns are
either derived from ``(seed, epoch, index)`` (the training loader, :mod:`manynets.datamodules.resumable`)
or saved in that object's own ``state_dict``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def collect() -> dict[str, Any]:
    """This process's random states as tensors and ints (no pickled objects)."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore(states: dict[str, Any]) -> None:
    """Set this process's random states from :func:`collect`'s output."""
    py = states["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = states["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather() -> list[dict[str, Any]]:
    """:func:`collect` of every rank, in rank order (a list of one without torch.distributed)."""
    mine = collect()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone
