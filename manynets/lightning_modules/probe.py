"""Linear probes on every chosen layer of a frozen, trained backbone (spec pinet_saturation §2.7;
PHD-LAB extract + probes; Richter et al. BMVC 2021: probe accuracy plateaus over the "tail" of
unproductive, low-saturation layers).

``ProbeModule`` loads the backbone of any manynets checkpoint (the model is rebuilt from the
checkpoint's hyper-parameters, as ``--ckpt_path`` does, and its ``.network`` is kept), freezes it in
eval mode and trains one linear probe per chosen layer (:class:`manynets.layers.probes.LinearProbe`:
multinomial logistic regression with scikit-learn's L2 objective) — **all probes in the same pass**
over the data, on the fly, no activations on disk. ``solver: sgd`` (default) streams the probes'
training over the epochs (any data size, DDP); ``solver: lbfgs`` keeps one epoch's pooled features in
memory and fits every probe exactly by full-batch L-BFGS (scikit-learn's optimum; 10x faster than
PHD-LAB's extract-to-disk + saga on digits, ``benchmarks/probe.py``). Train/val/test probe
accuracies are logged as ``probe/{split}/{layer}`` and written to ``probes.csv`` (one row per layer /
position) with a plot ``probes.png``. ``val/acc`` etc. remain the frozen backbone's own metrics.

Decisions where the official code differs: the backbone stays in eval mode for the training split too
(PHD-LAB extracts training latents with ``model.train()``, i.e. batch statistics and dropout); the
train accuracy is the running accuracy over the epoch's batches as the probes learn (PHD-LAB scores
the fitted probe on the training latents; ``sklearn_reference`` reports that number too).

``sklearn_reference=True`` (small data) also extracts pooled features in memory at the end of
``fit`` and fits scikit-learn's ``LogisticRegression`` per layer (``ref_*_acc`` columns).
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from manynets.analysis import (
    LayerTap,
    check_layer_options,
    extract_features,
    load_network,
    output_dir,
    select_layers,
    write_probe_results,
)
from manynets.analysis.progress import Progress
from manynets.errors import ConfigError, check_arg
from manynets.layers.probes import LinearProbe, ProbeAccuracy, fit_probe_lbfgs, probe_features, sklearn_probe_accuracies
from manynets.lightning_modules.classifier import BackboneFactory, ClassifierModule

_SKLEARN_SOLVERS = ("lbfgs", "liblinear", "newton-cg", "newton-cholesky", "sag", "saga")


def _deferred_backbone(num_classes: int, image_shape: tuple) -> nn.Module:
    """Placeholder until :meth:`ProbeModule.configure_model` loads the checkpoint's backbone."""
    return nn.Module()


class ProbeModule(ClassifierModule):
    """Frozen backbone + one linear probe per chosen layer, all trained in one pass.

    Args:
        checkpoint: a manynets checkpoint whose backbone is probed.
        backbone: instead of ``checkpoint``, a backbone built fresh (e.g. an untrained control).
        layers: regular expression on layer names (``-``-joined module paths, as the Saturation callback).
        types: layer classes probed (``Conv2d``, ``Linear``).
        pool_size: conv maps are adaptively average-pooled to d x d (PHD-LAB ``--downsample``, default 4).
        pixelwise: one probe per spatial position on the C channels instead of pooling.
        C: inverse L2 strength, as scikit-learn's ``LogisticRegression(C=...)``.
        standardize: standardise features with running statistics (StandardScaler).
        sklearn_reference: at the end of fit also fit scikit-learn probes on extracted features (small data).
        reference_solver: scikit-learn solver of the reference probes (PHD-LAB: ``saga``).
        reference_max_iter: iteration limit of the reference solver (PHD-LAB: 100).
        solver: ``sgd`` trains the probes with ``optimizer`` over the epochs, streaming (any data size,
            DDP); ``lbfgs`` keeps the pooled features of one training epoch in memory (one backbone pass
            for all layers) and fits every probe exactly by full-batch L-BFGS at the epoch end
            (scikit-learn's lbfgs optimum; one device; ``max_epochs: 1`` suffices).
        lbfgs_max_iter: L-BFGS iterations per layer (100: scikit-learn's default and PHD-LAB's saga budget).
        max_cache_gib: ``lbfgs`` stops with an error, naming the fix, when the cached features exceed this.
        dirpath: folder of ``probes.csv`` / ``probes.png`` (default: the trainer's ``log_dir``).
        optimizer: optimizer class and options; it sees only the probes' parameters.
        channels_last: the frozen backbone's convolution weights and the image batches in the channels-last
            memory format (faster convolutions under ``bf16-mixed``); the probes are unchanged.
        compile: ``torch.compile`` the frozen backbone's forward (its layer taps included) once it is loaded.
    """

    PAPER = "Alain & Bengio, ICLR-W 2017 (linear probes); Richter et al., BMVC 2021 (PHD-LAB)"

    loads_own_weights = True  # `manynets test` needs no --ckpt_path: its backbone comes from model.init_args.checkpoint

    def __init__(
        self,
        checkpoint: str = "",
        backbone: BackboneFactory | None = None,
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        layers: str | None = None,
        types: list[str] = ["Conv2d", "Linear"],  # noqa: B006
        pool_size: int = 4,
        pixelwise: bool = False,
        C: float = 1.0,
        standardize: bool = True,
        sklearn_reference: bool = False,
        reference_solver: str = "lbfgs",
        reference_max_iter: int = 1000,
        dirpath: str | None = None,
        solver: Literal["sgd", "lbfgs"] = "sgd",
        lbfgs_max_iter: int = 100,
        max_cache_gib: float = 8.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str | None = None,
        warmup_steps: int = 0,
        warmup_epochs: int = 0,
        no_weight_decay: list[str] | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        m = "model.init_args."
        check_arg(bool(checkpoint) != (backbone is not None), m + "checkpoint", checkpoint,
                  f"exactly one of checkpoint (a trained manynets .ckpt) and backbone (a fresh one); backbone is "
                  f"{backbone!r}", "Give one of model.init_args.checkpoint and model.init_args.backbone.")
        check_layer_options(m, layers, types)
        check_arg(not (pixelwise and sklearn_reference), m + "sklearn_reference", sklearn_reference,
                  "false with pixelwise: true", "sklearn_reference supports pooled features only.")
        check_arg(pool_size >= 1, m + "pool_size", pool_size, ">= 1 (maps pooled to d x d)", "PHD-LAB uses 4.")
        check_arg(C > 0, m + "C", C, "> 0 (inverse L2 strength, scikit-learn's C)")
        check_arg(solver in ("sgd", "lbfgs"), m + "solver", solver, "'sgd' (streaming) or 'lbfgs' (exact, in memory)")
        check_arg(reference_solver in _SKLEARN_SOLVERS, m + "reference_solver", reference_solver,
                  f"a LogisticRegression solver: {', '.join(_SKLEARN_SOLVERS)}")
        check_arg(reference_max_iter >= 1, m + "reference_max_iter", reference_max_iter, ">= 1")
        check_arg(lbfgs_max_iter >= 1, m + "lbfgs_max_iter", lbfgs_max_iter, ">= 1", "100 is scikit-learn's default.")
        check_arg(max_cache_gib > 0, m + "max_cache_gib", max_cache_gib, "> 0 GiB")
        super().__init__(backbone or _deferred_backbone, num_classes, image_shape, optimizer, lr_scheduler,
                         scheduler_interval, warmup_steps, warmup_epochs, no_weight_decay,
                         channels_last=channels_last, compile=compile)  # fmt: skip
        self.checkpoint = checkpoint
        self.probes = nn.ModuleDict()
        self.probe_acc = nn.ModuleDict()
        self.results: dict[str, dict[str, float]] = {}
        self.tap: LayerTap | None = None
        self._logits_match = True
        self._num_train = 0
        self._cache: dict[str, list[torch.Tensor]] = {}
        self._cache_labels: list[torch.Tensor] = []
        self._cache_bytes = 0
        if not checkpoint:
            self.configure_model()

    def configure_model(self) -> None:
        """Load the checkpoint's backbone (once), freeze it, hook the chosen layers and build the probes.

        Deferred to this Lightning hook (run before optimizers are made and before ``--ckpt_path`` is
        restored) so that a config naming a checkpoint can be parsed before that checkpoint exists.
        """
        if len(self.probes):
            return
        hp = self.hparams
        if self.checkpoint:
            self.network = load_network(self.checkpoint)
        self.network.requires_grad_(False)
        self.network.eval()
        self.modules_probed = select_layers(self.network, hp.layers, hp.types)
        self.tap = LayerTap(self.modules_probed)  # kept for the module's lifetime: every forward fills tap.outputs
        with torch.no_grad():
            try:
                logits = self.network(torch.zeros(2, *self.image_shape, device=self.device))
            except RuntimeError as err:
                raise ConfigError(
                    f"the probed backbone does not accept images of shape {self.image_shape} from the data "
                    f"module ({err}); use the data (size, channels) it was trained on."
                ) from err
        self._logits_match = logits.shape[-1] == self.num_classes  # else only the probes are scored
        for name, out in self.tap.outputs.items():  # in forward order
            feats = probe_features(out, hp.pool_size, hp.pixelwise)
            self.probes[name] = LinearProbe(feats.shape[1], feats.shape[2], self.num_classes, hp.standardize)
            self.probe_acc[name] = nn.ModuleDict({f"{s}_acc": ProbeAccuracy(feats.shape[1]) for s in ("train", "val", "test")})
        self.probes.to(self.device)
        self.probe_acc.to(self.device)
        super().configure_model()  # channels_last / compile of the frozen backbone

    def train(self, mode: bool = True):
        """The backbone stays in eval mode (frozen BN statistics, no dropout); the probes follow ``mode``."""
        super().train(mode)
        self.network.eval()
        return self

    # -- probes --------------------------------------------------------------------
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.network(images)  # the tap fills self.tap.outputs

    def _probe_logits(self) -> dict[str, torch.Tensor]:
        hp = self.hparams
        outputs = self.tap.outputs
        with torch.autocast(self.device.type, enabled=False):  # probes in float32 also under bf16-mixed
            return {n: self.probes[n](probe_features(outputs[n], hp.pool_size, hp.pixelwise)) for n in self.probes}

    def on_train_start(self) -> None:
        """N of the L2 term ``||W||^2 / (2 C N)``: the size of the training set (all ranks together)."""
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        try:
            self._num_train = len(dataset)
        except TypeError:  # an iterable dataset: batches x batch size x ranks
            self._num_train = int(self.trainer.num_training_batches * loader.batch_size * self.trainer.world_size)

    def on_fit_start(self) -> None:
        if self.hparams.solver == "lbfgs" and self.trainer.world_size > 1:
            raise RuntimeError(
                "ProbeModule solver=lbfgs fits on the features of one process; run it on one device "
                "(--trainer.devices=1) or use solver=sgd, which works under DDP."
            )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        images, labels = batch
        self.predict_logits(images)
        if self.hparams.solver == "lbfgs":
            self._cache_batch(labels)
            return None  # nothing to optimise per step: the probes are fitted at the epoch end
        l2 = 1.0 / (self.hparams.C * max(self._num_train, 1))
        loss = images.new_zeros(())
        for name, logits in self._probe_logits().items():
            loss = loss + self.probes[name].loss(logits, labels, l2)
            self.probe_acc[name]["train_acc"].update(logits.detach(), labels)
        self.check_finite(loss)
        self.log("train/probe_loss", loss.detach(), prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._cache_labels and self.trainer.is_last_batch:  # before the epoch-end validation
            self._fit_cached()

    def _cache_batch(self, labels: torch.Tensor) -> None:
        hp = self.hparams
        for name in self.probes:
            feats = probe_features(self.tap.outputs[name], hp.pool_size, hp.pixelwise).float()
            self._cache.setdefault(name, []).append(feats)
            self._cache_bytes += feats.numel() * feats.element_size()
        self._cache_labels.append(labels)
        if self._cache_bytes > hp.max_cache_gib * 2**30:
            raise MemoryError(
                f"ProbeModule solver=lbfgs: the cached features passed max_cache_gib={hp.max_cache_gib} after "
                f"{sum(len(y) for y in self._cache_labels)} training images. Lower pool_size, probe fewer "
                "layers (layers: <regex>), raise max_cache_gib, or use solver=sgd (streaming)."
            )

    def _fit_cached(self) -> None:
        """Full-batch L-BFGS fit of every probe on the epoch's cached features; train accuracy of the fit."""
        labels = torch.cat(self._cache_labels)
        progress = Progress(f"probes, L-BFGS fits of epoch {self.current_epoch}", len(self._cache), "layers")
        for name, chunks in self._cache.items():
            feats = torch.cat(chunks)
            probe = self.probes[name]
            fit_probe_lbfgs(probe, feats, labels, self.hparams.C, self.hparams.lbfgs_max_iter)
            with torch.no_grad():
                was_training = probe.training
                probe.eval()
                self.probe_acc[name]["train_acc"].update(probe(feats), labels)
                probe.train(was_training)
            progress.update()
        self._cache, self._cache_labels, self._cache_bytes = {}, [], 0

    def validation_step(self, batch, batch_idx: int) -> None:
        """One forward: the backbone's own metrics (when its classes are the data's) and the probes'."""
        images, labels = batch
        if self._logits_match:
            super().validation_step(batch, batch_idx)
        else:
            self.predict_logits(images)
        for name, out in self._probe_logits().items():
            self.probe_acc[name]["val_acc"].update(out, labels)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        if self._logits_match:
            super().test_step(batch, batch_idx, dataloader_idx)
        else:
            self.predict_logits(images)
        if dataloader_idx == 0:  # probe test accuracy on the first (clean) test set
            for name, out in self._probe_logits().items():
                self.probe_acc[name]["test_acc"].update(out, labels)

    def _collect(self, split: str) -> None:
        for name, metrics in self.probe_acc.items():
            acc = metrics[f"{split}_acc"].compute().reshape(-1)
            metrics[f"{split}_acc"].reset()
            if self.trainer.sanity_checking:
                continue
            keys = [name] if acc.numel() == 1 else [f"{name}-({i // self._side(acc)},{i % self._side(acc)})" for i in range(acc.numel())]
            for key, value in zip(keys, acc.tolist()):
                self.results.setdefault(key, {})[f"{split}_acc"] = value
            self.log(f"probe/{split}/{name}", acc.mean().float(), sync_dist=False)

    @staticmethod
    def _side(acc: torch.Tensor) -> int:
        return max(int(round(acc.numel() ** 0.5)), 1)

    def on_validation_epoch_end(self) -> None:
        self._collect("val")

    def on_train_epoch_end(self) -> None:
        if self._cache_labels:
            self._fit_cached()
        self._collect("train")
        self.write_results()

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._collect("test")
        self.write_results()

    # -- scikit-learn reference ----------------------------------------------------------
    def on_fit_end(self) -> None:
        if not self.hparams.sklearn_reference or not self.trainer.is_global_zero:
            return
        dm = self.trainer.datamodule
        dm.setup("test")
        what = "probes, scikit-learn reference: {} features"
        train = extract_features(self.network, self.modules_probed, dm.train_dataloader(), self.hparams.pool_size,
                                 self.device, what.format("train"))  # fmt: skip
        evals = {
            split: extract_features(self.network, self.modules_probed, loader, self.hparams.pool_size, self.device,
                                    what.format(split))  # fmt: skip
            for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader()))
        }
        ref = sklearn_probe_accuracies(
            train, evals, self.hparams.C, self.hparams.reference_solver, self.hparams.reference_max_iter, self.hparams.standardize
        )
        for name, row in ref.items():
            self.results.setdefault(name, {}).update({f"ref_{k}": v for k, v in row.items()})
        self.write_results()

    # -- outputs ------------------------------------------------------------------------
    def write_results(self) -> None:
        """``probes.csv`` (layer, train/val/test accuracy, references) and ``probes.png`` on rank 0."""
        if self.results and self.trainer.is_global_zero:
            directory = output_dir(self.trainer, self.hparams.dirpath)
            write_probe_results(self.results, directory, self.trainer, plot=not self.hparams.pixelwise)
