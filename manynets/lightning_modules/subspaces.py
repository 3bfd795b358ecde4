"""Learning Neural Network Subspaces (Wortsman et al., ICML 2021): train a line, curve or simplex of
networks at the cost of one (spec §3).

Any backbone becomes a subspace with :func:`manynets.layers.subspace.to_subspace` (every Conv2d,
Linear and BatchNorm of stem, body and head; feature maps or vectors, e.g. an MLP of Linear layers),
the extra parameter sets drawn with the backbone's own recipe. Points are computed in the
parameters' dtype (float64 for a float64 model). Each training batch (or each of ``num_samples``
chunks of it) is computed at a random point: α ~ U[0, 1] for lines and curves, t ~ Dirichlet(1)
for simplexes, one draw for the whole network or one per layer (``layerwise``). The loss is
cross-entropy + β·cos²(θ_i, θ_j) for a random pair of parameter sets (the curve's control point
included), spec §3.2. YAML example::

    model:
      class_path: manynets.lightning_modules.SubspaceModule
      init_args:
        kind: line            # or curve, or simplex with num_vertices: 3
        beta: 1.0
        backbone: {class_path: manynets.networks.CifarResNet, init_args: {depth: 20}}

**Evaluation point and BatchNorm.** Validation and test use the midpoint α = 0.5 (centroid for a
simplex). The BN running statistics are shared by the whole subspace, so during training they are
a mixture over random points:

- validation uses these shared statistics, except every ``recompute_bn_every_n_epochs``-th epoch
  and the last one, where the statistics of the midpoint are recomputed over the training data
  first and restored afterwards (official: every 10 epochs, with recomputed BN); ``val/bn_recomputed``
  says which;
- test recomputes them at the midpoint (``test_recompute_bn``, official behaviour).

The full α sweep, the pair ensembles and the simplex ensembles are the
:class:`~manynets.callbacks.SubspaceSweep` callback.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F

from manynets.analysis.bn_recompute import recompute_bn
from manynets.errors import check_arg
from manynets.layers.subspace import (
    combined_parameters,
    cosine_similarity_squared,
    set_point,
    subspace_layers,
    to_subspace,
)
from manynets.layers.subspace_points import Kind, midpoint, num_parameter_sets, sample_coefficients
from manynets.lightning_modules.classifier import BackboneFactory, ClassifierModule


class SubspaceModule(ClassifierModule):
    """A line / curve / simplex of networks (spec §3).

    Args:
        kind: ``line`` (2 parameter sets), ``curve`` (quadratic Bezier: endpoints θ₀, θ₁ and control
            point θ₂) or ``simplex`` (``num_vertices`` sets).
        num_vertices: vertices of the simplex, 2..9 (only for ``simplex``).
        layerwise: an independent point per layer instead of one per batch (spec §3.2).
        beta: weight of the cos² regulariser (official 1.0; 0 switches it off).
        num_samples: split each batch into this many chunks, each at its own point; losses averaged.
        init: how parameter sets 1.. are initialised, each independently: ``backbone`` applies the
            backbone's own recipe (:meth:`~manynets.networks.Backbone.init_weights`) to a copy of each
            original layer, one layer at a time (for CifarResNet/ResNet with ``init: kaiming_fan_in``
            this is the official Kaiming fan_in; BN at γ = 1, β = 0); ``kaiming_fan_in`` (convs and
            Linear) or ``default`` (PyTorch's) re-initialise with BN sets at γ = 1, β = 0.
        recompute_bn_every_n_epochs: recompute the midpoint's BN statistics before validation every
            n-th epoch and at the last one (0: never; validation then uses the shared statistics).
        test_recompute_bn: recompute the midpoint's BN statistics over the training data at test start.
        bn_batches: number of training batches for each recompute (None: the whole epoch, official).
    """

    PAPER = "Wortsman et al., ICML 2021 (Learning Neural Network Subspaces)"

    def __init__(
        self,
        backbone: BackboneFactory,
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        kind: Kind = "line",
        num_vertices: int | None = None,
        layerwise: bool = False,
        beta: float = 1.0,
        num_samples: int = 1,
        init: Literal["backbone", "kaiming_fan_in", "default"] = "backbone",
        recompute_bn_every_n_epochs: int = 0,
        test_recompute_bn: bool = True,
        bn_batches: int | None = None,
        **kwargs: Any,
    ) -> None:
        m = "model.init_args."
        check_arg(kind == "simplex" or num_vertices is None, m + "num_vertices", num_vertices,
                  f"null for kind: {kind}", "num_vertices is only for kind: simplex.")
        check_arg(kind != "simplex" or (num_vertices is not None and 2 <= num_vertices <= 9), m + "num_vertices",
                  num_vertices, "an int in 2..9 for kind: simplex", "The official code has SimplexConv2..9.")
        num_sets = num_parameter_sets(kind, num_vertices)
        check_arg(num_samples >= 1, m + "num_samples", num_samples, ">= 1 (points per batch)")
        check_arg(beta >= 0, m + "beta", beta, ">= 0 (weight of the cos^2 regulariser)", "1.0 officially; 0 is off.")
        check_arg(recompute_bn_every_n_epochs >= 0, m + "recompute_bn_every_n_epochs", recompute_bn_every_n_epochs,
                  ">= 0", "0 never recomputes before validation.")
        check_arg(bn_batches is None or bn_batches >= 1, m + "bn_batches", bn_batches, "null (whole epoch) or >= 1")
        check_arg(init in ("backbone", "kaiming_fan_in", "default"), m + "init", init,
                  "'backbone', 'kaiming_fan_in' or 'default'")
        super().__init__(backbone, num_classes, image_shape, **kwargs)
        self.kind, self.num_vertices, self.num_sets = kind, num_vertices, num_sets
        to_subspace(self.network, kind, num_vertices, init=self.network.init_weights if init == "backbone" else init)
        self._layers = subspace_layers(self.network)
        self._saved_bn: dict[str, torch.Tensor] | None = None

    # -- points ----------------------------------------------------------------------
    def _parameter_dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    def evaluation_coefficients(self) -> torch.Tensor:
        """Coefficients (S,) of the evaluation point: midpoint (line, curve) or centroid (simplex), in
        the parameters' dtype."""
        return midpoint(self.kind, self.num_vertices, dtype=self._parameter_dtype())

    def sample_point(self, generator: torch.Generator | None = None) -> None:
        """Draw the training point(s) in the parameters' dtype: one for every layer, or one per layer
        when ``layerwise``; ``generator`` (on the model's device) gives fixed draws."""
        n = len(self._layers) if self.hparams.layerwise else 1
        coefficients = sample_coefficients(self.kind, self.num_vertices, n, device=self.device,
                                           dtype=self._parameter_dtype(), generator=generator)  # fmt: skip
        for i, layer in enumerate(self._layers):
            layer.coefficients = coefficients[i : i + 1] if n > 1 else coefficients

    # -- hooks -----------------------------------------------------------------------
    def training_loss(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean CE over ``num_samples`` chunks (one point each) + β·cos² of a random pair of sets;
        returns (loss, logits of every image, labels)."""
        n = self.hparams.num_samples
        if n > images.shape[0]:
            raise ValueError(f"model.num_samples={n} exceeds the batch size {images.shape[0]}.")
        losses, all_logits = [], []
        for x, y in zip(images.tensor_split(n), labels.tensor_split(n)):
            self.sample_point()
            with combined_parameters(self._layers):  # all layers' parameters at once (a few foreach ops)
                logits = self.network(x)
            losses.append(F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing))
            all_logits.append(logits)
        loss = losses[0] if n == 1 else torch.stack(losses).mean()
        if self.hparams.beta > 0:
            i, j = torch.randperm(self.num_sets)[:2].tolist()
            cos2 = cosine_similarity_squared(self._layers, i, j)
            if self._trainer is not None:
                self.log("train/cos2", cos2.detach())
            loss = loss + self.hparams.beta * cos2
        return loss, torch.cat(all_logits) if n > 1 else all_logits[0], labels

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the midpoint (line, curve) or centroid (simplex)."""
        set_point(self.network, self.evaluation_coefficients())
        with combined_parameters(self._layers):
            return self.network(images)

    # -- BN statistics of the evaluation point -----------------------------------------
    def train_batches(self):
        """The (augmented) training loader of the data module, for BN recomputes."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return None
        if getattr(dm, "train_dataset", True) is None:
            dm.setup("fit")
        return dm.train_dataloader()

    def recompute_bn(self) -> bool:
        """Recompute the evaluation point's BN statistics over the training data (spec §3.3)."""
        batches = self.train_batches()
        if batches is None:
            warnings.warn("SubspaceModule: no data module, so BN statistics are not recomputed.", stacklevel=2)
            return False
        with torch.inference_mode(False), torch.no_grad():
            recompute_bn(self.network, batches, self.evaluation_coefficients(), self.hparams.bn_batches)
        return True

    def _recompute_now(self) -> bool:
        every = self.hparams.recompute_bn_every_n_epochs
        if not every or self.trainer.sanity_checking:
            return False
        epoch = self.current_epoch + 1
        return epoch % every == 0 or epoch == self.trainer.max_epochs

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        recomputed = False
        if self._recompute_now():
            self._saved_bn = {k: v.clone() for k, v in self.network.state_dict().items() if "running_" in k
                              or "num_batches_tracked" in k}  # fmt: skip
            recomputed = self.recompute_bn()
        self.log("val/bn_recomputed", float(recomputed))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self._saved_bn is not None:  # back to the shared statistics of training
            self.network.load_state_dict(self._saved_bn, strict=False)
            self._saved_bn = None

    def on_test_start(self) -> None:
        super().on_test_start()
        if self.hparams.test_recompute_bn:
            self.recompute_bn()
