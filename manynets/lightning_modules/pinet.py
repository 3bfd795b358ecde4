"""π-nets: infinite-width feature-learning MLPs and their finite twins (Yang, Santacroce & Hu, ICLR 2022).

Spec pinet_saturation Part 1; official code ``santacml/pilim`` (paper numbers from ``pilimit_orig``).
The network is the :class:`~manynets.networks.PiMLP` backbone (``width: 0`` infinite, ``width: n`` the
finite twin or, with ``gaussian_init``, the μ-net); its options (r, depth, width, the alphas, ...) are
``model.init_args.backbone.init_args.*`` (:data:`MOVED_OPTIONS` maps the former ``model.init_args.*``
keys). ``image_shape`` gives d_in = C*H*W and ``num_classes`` d_out, linked from the data by the CLI.
This module owns what is the method's own: the π-SGD step, clipping, the parameter groups, the loss,
checkpoint resizing and the memory estimate.

Training uses manual optimisation with :class:`~manynets.layers.pi_optim.PiSGD` (one step per batch):
backward -> (finite: project gradients) -> clip -> append rows / SGD -> scheduler. Parameter groups
(``--no-apply-lr-mult-to-wd`` = ``apply_lr_mult_to_wd: false``): input layer ``lr * first_layer_lr_mult``,
biases ``lr * bias_lr_mult``, hidden layers ``lr``, readout ``lr * last_layer_lr_mult``.
Gradient clipping (spec §1.6): π-layers by the A/B norm, per tensor or global; with
``gclip_follows_lr`` (default, ``pilimit_orig`` and the paper) the clip value is multiplied by the
current/initial learning-rate ratio, so it drops with the lr at the milestones (``pilimit_lib`` keeps
it constant: ``gclip_follows_lr: false``). Schedulers step per batch or per epoch as configured
(MultiStepLR with milestones in epochs at ``scheduler_interval: epoch`` = the paper's per-batch
milestones ``epochs * len(loader)``).

Checkpoints hold the grown state exactly; loading (``--ckpt_path``) resizes every π-layer first. State
dicts written before the backbone existed (``network.input.*``, ``network.hidden.*``, ``network.output.*``;
``network.linears.*``, ``network.omega*``) are renamed on load (:func:`upgrade_state_dict`); their
hyper-parameters move with :func:`upgrade_hyperparameters`. Before training the module logs the
estimated final state and peak memory (spec §1.9).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from manynets.errors import ConfigError, check_arg
from manynets.layers.pi import InfPiLayer, PiInputLayer, estimate_memory, pi_layer_rows, state_shapes_only
from manynets.layers.pi_optim import PiSGD, clip_gradients
from manynets.lightning_modules.classifier import BackboneFactory, ClassifierModule, _factory_target
from manynets.networks import PiMLP

_BACKBONE_OPTIONS = ("r", "depth", "width", "first_layer_alpha", "last_layer_alpha", "bias_alpha",
                     "last_bias_alpha", "layernorm", "readout_zero_init", "state_dtype", "chunk_size",
                     "gaussian_init", "gproj")  # fmt: skip
MOVED_OPTIONS: dict[str, str] = {
    **{f"model.init_args.{k}": f"model.init_args.backbone.init_args.{k}" for k in _BACKBONE_OPTIONS},
    "model.init_args.init_seed": "model.init_args.backbone.init_args.seed",
}
"""Former PiNetModule options -> their keys on the PiMLP backbone
(``model.init_args.backbone: {class_path: manynets.networks.PiMLP, init_args: {...}}``)."""


def upgrade_hyperparameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters of a checkpoint written before the PiMLP backbone, moved to the new keys (a new dict).

    The former options (:data:`MOVED_OPTIONS`) go into ``backbone: {class_path: manynets.networks.PiMLP,
    init_args: {...}}``; hyper-parameters without them are returned unchanged.
    """
    moved = {old.rsplit(".", 1)[1]: new.rsplit(".", 1)[1] for old, new in MOVED_OPTIONS.items()}
    if not any(k in hparams for k in moved):
        return dict(hparams)
    out = {k: v for k, v in hparams.items() if k not in moved}
    init_args = {moved[k]: v for k, v in hparams.items() if k in moved}
    out["backbone"] = {"class_path": "manynets.networks.PiMLP", "init_args": init_args}
    return out


def upgrade_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "network.") -> dict[str, torch.Tensor]:
    """Rename, in place, the keys of a pre-backbone π-net state dict to PiMLP's; returns it.

    Infinite (``InfMLP``): ``input.*`` -> ``stem.1.*``, ``hidden.{i}.*`` -> ``body.{i}.*``, ``output.*`` ->
    ``head.*``. Finite (``FinPiMLP``): ``linears.{l}.weight`` / ``.bias``, ``omega{l}``, ``gcovinv{l}`` ->
    ``linear.weight``, ``bias``, ``omega``, ``gcovinv`` of the l-th layer (``stem.1``, ``body.{2l-1}``,
    ``head.1``). Other keys are untouched.
    """
    old = re.compile(re.escape(prefix) + r"(input|hidden\.\d+|output|linears\.\d+|omega\d+|gcovinv\d+)(\.|$)(.*)")
    matches = {k: old.match(k) for k in list(state_dict)}
    matches = {k: m for k, m in matches.items() if m}
    if not matches:
        return state_dict
    last = max((int(m.group(1).split(".")[1]) for m in matches.values() if m.group(1).startswith("linears")),
               default=0)  # fmt: skip

    def finite(l: int) -> str:
        return "stem.1" if l == 0 else "head.1" if l == last else f"body.{2 * l - 1}"

    for key, m in matches.items():
        part, rest = m.group(1), m.group(3)
        if part == "input":
            new = f"stem.1.{rest}"
        elif part == "output":
            new = f"head.{rest}"
        elif part.startswith("hidden."):
            new = f"body.{part.split('.')[1]}.{rest}"
        elif part.startswith("linears."):
            new = f"{finite(int(part.split('.')[1]))}.{'linear.weight' if rest == 'weight' else rest}"
        else:  # omega{l} / gcovinv{l}
            name, l = re.match(r"([a-z]+)(\d+)", part).groups()
            new = f"{finite(int(l))}.{name}"
        state_dict[prefix + new] = state_dict.pop(key)
    return state_dict


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def _main_parameter(layer: torch.nn.Module) -> torch.Tensor:
    """What π-SGD updates for a layer's weights: A1, a π-layer's Amult (its rows), or a finite weight."""
    if isinstance(layer, PiInputLayer):
        return layer.A1
    return layer.Amult if isinstance(layer, InfPiLayer) else layer.linear.weight


class PiNetModule(ClassifierModule):
    """π-net classifier: a PiMLP (infinite or finite width) trained by π-SGD with row appends and clipping.

    Defaults are ``cifar10mlp``'s (spec §1.11) except where noted (module doc).

    Args:
        backbone: a :class:`~manynets.networks.PiMLP` with its options (r, depth, width, alphas, ...).
        first_layer_lr_mult: learning-rate multiplier of the input layer.
        last_layer_lr_mult: learning-rate multiplier of the readout.
        bias_lr_mult: learning-rate multiplier of the biases.
        apply_lr_mult_to_wd: False divides each group's weight decay by its lr multiplier (decay 1 - lr wd).
        gclip: gradient clipping value (0: off).
        gclip_per_param: clip each parameter tensor's gradient separately instead of the global norm.
        gclip_follows_lr: scale gclip by the lr ratio (paper / orig) instead of keeping it constant (lib).
        loss: ``xent`` or ``mse`` (one-hot minus 0.1 targets, as cifar10mlp).
        optimizer: must be :class:`~manynets.layers.pi_optim.PiSGD` (lr, weight_decay).
    """

    PAPER = "Yang, Santacroce & Hu, ICLR 2022 (pi-limit)"

    upgrade_hyperparameters = staticmethod(upgrade_hyperparameters)  # used by the CLI for --ckpt_path

    def __init__(
        self,
        backbone: BackboneFactory,
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        optimizer: OptimizerCallable = functools.partial(PiSGD, lr=2.0, weight_decay=1e-4),
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] | None = None,
        first_layer_lr_mult: float = 0.1,
        last_layer_lr_mult: float = 1.0,
        bias_lr_mult: float = 0.5,
        apply_lr_mult_to_wd: bool = True,
        gclip: float = 0.2,
        gclip_per_param: bool = False,
        gclip_follows_lr: bool = True,
        loss: Literal["xent", "mse"] = "xent",
    ) -> None:
        m = "model.init_args."
        target = _factory_target(backbone)
        check_arg(target is None or issubclass(target, PiMLP), m + "backbone",
                  getattr(target, "__name__", backbone), "manynets.networks.PiMLP (the π-net's own MLP)",
                  "Set model.init_args.backbone.class_path: manynets.networks.PiMLP.")  # fmt: skip
        check_arg(gclip >= 0, m + "gclip", gclip, ">= 0", "0 turns gradient clipping off.")
        for name, mult in (("first_layer_lr_mult", first_layer_lr_mult), ("last_layer_lr_mult", last_layer_lr_mult),
                           ("bias_lr_mult", bias_lr_mult)):  # fmt: skip
            check_arg(mult >= 0, m + name, mult, ">= 0", "0 freezes the group.")
        target = _factory_target(optimizer)
        check_arg(target is not None and issubclass(target, PiSGD), m + "optimizer",
                  getattr(target, "__name__", optimizer), "manynets.layers.PiSGD (it appends rows to the "
                  "π-layers)", "Set model.init_args.optimizer.class_path: manynets.layers.PiSGD.")
        super().__init__(backbone, num_classes, image_shape, optimizer, lr_scheduler, scheduler_interval)
        if not isinstance(self.network, PiMLP):
            raise ConfigError(f"model.init_args.backbone = {type(self.network).__name__}: PiNetModule needs "
                              "manynets.networks.PiMLP (the π-net's own MLP). Set "
                              "model.init_args.backbone.class_path: manynets.networks.PiMLP.")  # fmt: skip
        self.automatic_optimization = False

    # -- groups and optimizer ------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Groups with ``lr_mult`` / ``wd_mult``: first layer, biases, hidden π-layers, readout (module doc)."""
        h, layers = self.hparams, self.network.layers()
        first, last = [_main_parameter(layers[0])], [_main_parameter(layers[-1])]
        hidden, biases = [_main_parameter(l) for l in layers[1:-1]], [l.bias for l in layers]
        groups = []
        for name, params, mult in (("first_layer", first, h.first_layer_lr_mult), ("bias", biases, h.bias_lr_mult),
                                   ("hidden", hidden, 1.0), ("readout", last, h.last_layer_lr_mult)):  # fmt: skip
            if params:
                wd_mult = 1.0 if h.apply_lr_mult_to_wd or mult == 0 else 1.0 / mult
                groups.append({"params": params, "lr_mult": mult, "wd_mult": wd_mult, "name": name})
        return groups

    # -- training ------------------------------------------------------------------
    def training_loss(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy, or the summed squared error to one-hot minus 0.1 (``mse``), averaged over the batch."""
        logits = self(images)
        if self.hparams.loss == "mse":
            target = F.one_hot(labels, self.num_classes).to(logits.dtype) - 0.1
            return F.mse_loss(logits, target, reduction="sum") / logits.shape[0], logits, labels
        return F.cross_entropy(logits, labels), logits, labels

    def current_gclip(self) -> float:
        """gclip, scaled by the scheduled/initial lr ratio when ``gclip_follows_lr`` (schedulers record
        ``initial_lr``; without one the lr, and so the clip, stays constant)."""
        clip = self.hparams.gclip
        if clip <= 0 or not self.hparams.gclip_follows_lr:
            return clip
        group = self.optimizers().optimizer.param_groups[0]
        initial = group.get("initial_lr", group["lr"])
        return clip * group["lr"] / initial if initial else clip

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        loss, logits, targets = self.training_loss(images, labels)
        self.check_finite(loss)
        self.manual_backward(loss)
        self.network.project_gradients()
        norm = clip_gradients(self.network, self.current_gclip(), self.hparams.gclip_per_param)
        opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.trainer.lr_scheduler_configs[0].interval == "step":
            scheduler.step()
        self.train_acc(logits.detach(), targets)
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("train/grad_norm", norm)
        if self.network.infinite:
            self.log("pi/rows", float(self.network.head.num_rows))
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.trainer.lr_scheduler_configs[0].interval == "epoch":
            scheduler.step()

    def setup(self, stage: str) -> None:
        """Refuse 16-bit trainer precisions: the π-layers evaluate arccos and sqrt(1 - q^2) of cosines near 1
        and sum over all M rows, which bf16/fp16 (3 significant digits) would wreck; the π kernel computes in
        at least float32 whatever the inputs (``manynets.cuda_ops.pi_kernel``). The other fast-path options of
        the base class are not offered either: ``channels_last`` (a PiMLP has no convolutions) and ``compile``
        (the state grows by a batch of rows every step, so every step would meet new shapes, and the π kernel
        is already one opaque custom op to the compiler)."""
        precision = str(getattr(self.trainer, "precision", "32-true"))
        if "16" in precision:
            raise ConfigError(
                f"trainer.precision = {precision}: the π-net computes in float32 (its kernel's arccos and "
                "square roots of cosines near 1 need it). Use trainer.precision: 32-true; to halve the state's "
                "memory store it in bfloat16 with model.init_args.backbone.init_args.state_dtype: bfloat16."
            )

    def on_fit_start(self) -> None:
        """Log the estimated final state and peak memory for the configured run (spec §1.9)."""
        net = self.network
        if not net.infinite:
            return
        steps = self.trainer.estimated_stepping_batches
        batch = getattr(self.trainer.datamodule, "batch_size", None) if self.trainer.datamodule else None
        if batch is None or steps is None or steps == float("inf"):
            rank_zero_info("π-net: cannot estimate the final state size (unknown batch size or number of steps).")
            return
        steps = int(steps)
        est = estimate_memory(net.d_in, net.num_classes, net.r, net.depth, batch, steps, net.state_dtype,
                              net.chunk_size, net.block_size)  # fmt: skip
        rank_zero_info(
            f"π-net: after {steps} steps of batch {batch} every infinite layer holds M = {est['rows']:,} rows "
            f"(r={net.r}, depth={net.depth}, A/B in {net.state_dtype}): final state "
            f"{_fmt_bytes(est['state'])}, peak training memory up to {_fmt_bytes(est['peak'])}."
        )

    # -- checkpoints ---------------------------------------------------------------
    def _resize_to(self, state_dict: dict[str, torch.Tensor]) -> None:
        upgrade_state_dict(state_dict)
        rows = pi_layer_rows(state_dict)
        for name, module in self.named_modules():
            if isinstance(module, InfPiLayer) and f"{name}." in rows:
                module.resize_rows(rows[f"{name}."])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rename pre-backbone keys and resize every π-layer to the checkpoint's M, then the base class
        checks the shapes."""
        self._resize_to(checkpoint.get("state_dict", {}))
        super().on_load_checkpoint(checkpoint)

    def _check_fits(self, checkpoint: dict[str, Any]) -> None:
        """The base class's check compares shapes: read the π-layers' A/B as shapes, not concatenated copies."""
        with state_shapes_only(self):
            super()._check_fits(checkpoint)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Rename pre-backbone keys (in place) and resize the π-layers, then load."""
        self._resize_to(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
