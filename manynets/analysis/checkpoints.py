"""The trained backbone of a manynets checkpoint (probes, checkpoint ensembles; ARCHITECTURE.md "Checkpoints").

Checkpoints are Lightning's, read with ``weights_only=True``; the backbone's weights are the
``network.*`` entries of the state dict. :func:`load_network` either rebuilds the LightningModule from
the checkpoint's hyper-parameters (as ``--ckpt_path`` does) and returns its ``.network``, or loads the
weights into a backbone the caller built from its own config. Every failure is a
:class:`~manynets.errors.CheckpointMismatchError` naming the config key and the fix.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from manynets.errors import CheckpointMismatchError, CheckpointNotFoundError

PREFIX = "network."


def read_checkpoint(path: str | Path, key: str) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (``weights_only=True``); ``key`` is the config key that named it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{key} = '{path}' is not a file; give a .ckpt written by `manynets fit` "
            "(e.g. <run>/checkpoints/last.ckpt), or train it first (see the config header)."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # truncated, not a checkpoint, or pickled objects
        raise CheckpointMismatchError(
            f"{key} = '{path}' cannot be read as a checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "Give a .ckpt written by `manynets fit`."
        ) from None


def load_network(path: str | Path, network: nn.Module | None = None, key: str = "model.init_args.checkpoint") -> nn.Module:
    """The trained backbone of the checkpoint at ``path``.

    With ``network`` given, its weights are loaded into it (strict) and it is returned; otherwise the
    model is rebuilt from the checkpoint's hyper-parameters (written by the manynets CLI) and its
    ``.network`` is returned with the weights loaded.
    """
    ckpt = read_checkpoint(path, key)
    if network is None:
        network = _rebuild(ckpt, path, key)
    weights = {k[len(PREFIX) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(PREFIX)}
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointMismatchError(
            f"{key}: checkpoint '{path}' does not fit the backbone {type(network).__name__} of this config "
            f"({str(err).splitlines()[0]} ...). Use the backbone options the checkpoint was trained with "
            "(config.yaml beside its log directory)."
        ) from None
    return network


def _rebuild(ckpt: dict[str, Any], path: str | Path, key: str) -> nn.Module:
    import lightning.pytorch as pl
    from lightning.pytorch.cli import instantiate_module

    hparams = dict(ckpt.get("hyper_parameters", {}))
    if "_class_path" not in hparams:
        raise CheckpointMismatchError(
            f"{key}: checkpoint '{path}' has no '_class_path' hyper-parameter: it was not written by the "
            "manynets CLI. Train the backbone with `manynets fit`, or give the backbone in the config instead."
        )
    hparams.pop("_instantiator", None)
    network = getattr(instantiate_module(pl.LightningModule, hparams), "network", None)
    if not isinstance(network, nn.Module):
        raise CheckpointMismatchError(
            f"{key}: the model in '{path}' ({hparams['_class_path']}) has no .network backbone to load."
        )
    return network
