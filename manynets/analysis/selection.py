"""Which layers an analysis looks at: the parts of a model and the layers chosen in them (spec
pinet_saturation §2.1: delve hooks leaf Conv/Linear modules, named by their module path joined by ``-``).

The parts of a manynets LightningModule (:func:`model_parts`) are its backbone ``network``, whose layers
keep their path inside the backbone (``body-0-conv1``, ``head``), and the method's own modules beside
it, named from the module (MixMo's member ``stems-1``, ``heads-0``; superposition's ``unbinding-linear``;
a checkpoint ensemble's ``members-0-...``). Metric collections are not parts. A plain ``nn.Module`` is one
part with no prefix.

Layer types by name (:data:`LAYER_TYPES`): ``Linear`` covers ``nn.Linear`` and the π-net's linear
layers (:class:`~manynets.layers.pi.PiInputLayer`, :class:`~manynets.layers.pi.InfPiLayer`), whose
output is the r-dimensional coefficient vector g of the infinite-width preactivation ``h = n^-1/2 Omega g``
(``Omega^T Omega / n -> I``, so the explained-variance shares of h are those of g; the saturation of a
π-layer is ID / r). Subspace layers subclass ``nn.Conv2d`` / ``nn.Linear`` and are selected as such.
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn
from torchmetrics import Metric

from manynets.errors import ConfigError, check_arg
from manynets.layers.pi import InfPiLayer, PiInputLayer

LAYER_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "Conv2d": (nn.Conv2d,),
    "Linear": (nn.Linear, PiInputLayer, InfPiLayer),
    "Conv1d": (nn.Conv1d,),
    "Conv3d": (nn.Conv3d,),
}


def check_layer_options(prefix: str, layers: str | None, types: Sequence[str]) -> None:
    """Constructor check of the ``layers`` regular expression and ``types`` names; ``prefix`` is the
    argument path as written in a config (``model.init_args.``, ``trainer.callbacks[Saturation].init_args.``)."""
    try:
        re.compile(layers or "")
    except re.error as err:
        raise ConfigError(f"{prefix}layers = {layers!r}: expected a regular expression on layer names ({err}). "
                          "Escape special characters, e.g. 'body-0' or 'stem|head'.") from None  # fmt: skip
    unknown = [t for t in types if t not in LAYER_TYPES]
    check_arg(bool(types) and not unknown, prefix + "types", list(types), f"names among {sorted(LAYER_TYPES)}",
              f"These are unknown: {unknown}." if unknown else "Give at least one layer type.")


def _holds_metrics(module: nn.Module) -> bool:
    return any(isinstance(m, Metric) for m in module.modules())


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """``{prefix: module}`` searched for layers: the backbone ``network`` (prefix ``""``) and the method's
    other parameterised child modules (prefix = attribute name); a module without ``network``: itself."""
    network = getattr(model, "network", None)
    if not isinstance(network, nn.Module):
        return {"": model}
    parts = {"": network}
    for name, child in model.named_children():
        if child is not network and any(True for _ in child.parameters()) and not _holds_metrics(child):
            parts[name] = child
    return parts


def select_layers(
    model: nn.Module, layers: str | None = None, types: Sequence[str] = ("Conv2d", "Linear")
) -> dict[str, nn.Module]:
    """Modules of the given types in the parts of ``model`` (:func:`model_parts`) whose delve-style name
    (path joined by ``-``) matches the regular expression ``layers`` (searched; ``None``: all).

    Raises :class:`~manynets.errors.ConfigError` when nothing matches, listing the candidate names.
    """
    unknown = [t for t in types if t not in LAYER_TYPES]
    if unknown:
        raise ConfigError(f"layer types {unknown}; expected names among {sorted(LAYER_TYPES)}")
    classes = tuple(c for t in types for c in LAYER_TYPES[t])
    candidates: dict[str, nn.Module] = {}
    for prefix, part in model_parts(model).items():
        for name, module in part.named_modules():
            path = ".".join(p for p in (prefix, name) if p)
            if path and isinstance(module, classes):
                candidates[path.replace(".", "-")] = module
    pattern = re.compile(layers) if layers else None
    chosen = {n: m for n, m in candidates.items() if pattern is None or pattern.search(n)}
    if not chosen:
        shown = ", ".join(list(candidates)[:30]) + (" ..." if len(candidates) > 30 else "")
        raise ConfigError(
            f"layer filter {layers!r} with types {list(types)} matches no layer of {type(model).__name__}; "
            f"candidates: {shown or 'none'}. Change the `layers` regular expression or `types`."
        )
    return chosen


def layer_width(module: nn.Module) -> int:
    """D of a layer: output channels / features (the coefficient dimension r of a π-layer)."""
    for attr in ("out_channels", "out_features", "r_out"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    if isinstance(module, PiInputLayer):
        return int(module.A1.shape[1])
    raise ConfigError(f"cannot tell the width of {type(module).__name__}; choose Conv or Linear layers (`types`)")
