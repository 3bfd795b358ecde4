"""ClassifierModule and metrics against independent computations."""

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from manynets.errors import ConfigError
from manynets.lightning_modules.classifier import ClassifierModule, _factory_target, classification_metrics
from manynets.metrics import BrierScore, Disagreement, NegativeLogLikelihood
from manynets.networks import Backbone


class TinyNet(Backbone):
    def __init__(self, num_classes, image_shape=(1, 4, 4)):
        super().__init__()
        c = image_shape[0]
        self.stem = nn.Conv2d(c, 4, 3, padding=1)
        self.body = nn.Sequential(nn.BatchNorm2d(4), nn.PReLU(4))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, num_classes)
        self.feature_dim = self.stem_channels = 4


def ece_reference(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return total


def test_metrics_match_numpy():
    torch.manual_seed(1)
    logits, labels = torch.randn(500, 7) * 3, torch.randint(0, 7, (500,))
    metrics = classification_metrics(7, "x/")
    for chunk in range(0, 500, 128):  # streaming over batches
        metrics.update(logits[chunk : chunk + 128], labels[chunk : chunk + 128])
    out = {k: v.item() for k, v in metrics.compute().items()}
    p, y = logits.softmax(-1).double().numpy(), labels.numpy()
    assert out["x/acc"] == pytest.approx((p.argmax(1) == y).mean(), abs=1e-6)
    assert out["x/nll"] == pytest.approx(-np.log(p[np.arange(500), y]).mean(), rel=1e-5)
    assert out["x/brier"] == pytest.approx(((p - np.eye(7)[y]) ** 2).sum(1).mean(), rel=1e-5)
    assert out["x/ece"] == pytest.approx(ece_reference(p, y), abs=1e-5)


def test_ece_applies_the_softmax_to_logits_that_lie_in_0_1():
    """Logits all in [0, 1] are still logits: torchmetrics alone would read them as probabilities."""
    torch.manual_seed(2)
    logits, labels = torch.rand(300, 5), torch.randint(0, 5, (300,))
    metrics = classification_metrics(5, "")
    metrics.update(logits, labels)
    p = logits.softmax(-1).double().numpy()
    assert metrics.compute()["ece"].item() == pytest.approx(ece_reference(p, labels.numpy()), abs=1e-5)


def test_brier_perfect_and_worst():
    brier = BrierScore()
    brier.update(torch.tensor([[100.0, -100.0]]), torch.tensor([0]))
    assert brier.compute().item() == pytest.approx(0.0, abs=1e-6)
    brier = BrierScore()
    brier.update(torch.tensor([[100.0, -100.0]]), torch.tensor([1]))
    assert brier.compute().item() == pytest.approx(2.0, abs=1e-6)


def test_nll_equals_cross_entropy():
    logits, labels = torch.randn(64, 5), torch.randint(0, 5, (64,))
    nll = NegativeLogLikelihood()
    nll.update(logits, labels)
    assert nll.compute().item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_disagreement_over_pairs():
    # three members, four samples: member predictions [0,0,0,0], [0,1,0,1], [1,1,1,1]
    preds = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]])
    logits = F.one_hot(preds, 2).float()
    metric = Disagreement()
    metric.update(logits)
    # pairs: (0,1) 2/4, (0,2) 4/4, (1,2) 2/4 -> mean 8/12
    assert metric.compute().item() == pytest.approx(8 / 12)


def make_module(**kwargs) -> ClassifierModule:
    return ClassifierModule(backbone=TinyNet, num_classes=3, image_shape=(1, 4, 4), **kwargs)


def test_weight_decay_exclusions():
    module = make_module(no_weight_decay=["norm", "bias", "PReLU"])
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["network.head.weight", "network.stem.weight"]
    assert no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 5  # stem bias, BN weight+bias, PReLU weight, head bias
    by_name = make_module(no_weight_decay=["head."]).parameter_groups()
    assert len(by_name[1]["params"]) == 2


def test_ensemble_is_mean_of_member_logits():
    module = make_module()
    members = torch.randn(3, 5, 3)
    assert torch.equal(module._ensemble(members), members.mean(0))


def test_factory_target_finds_class_behind_partial():
    assert _factory_target(partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1)) is torch.optim.lr_scheduler.OneCycleLR
    assert _factory_target(torch.optim.SGD) is torch.optim.SGD


def test_fit_fills_onecycle_length_and_warmup(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,)))
    module = make_module(
        optimizer=partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1),
        warmup_steps=4,
    )
    seen = []

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])

    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[Record()], default_root_dir=tmp_path, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step"
    assert scheduler.scheduler.total_steps == 16
    onecycle = torch.optim.lr_scheduler.OneCycleLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 0.1, total_steps=16)
    expected = []
    for _ in range(16):
        expected.append(onecycle.get_last_lr()[0])
        onecycle.optimizer.step()
        onecycle.step()
    factors = [(i + 1) / 4 if i < 4 else 1.0 for i in range(16)]
    assert seen == pytest.approx([e * f for e, f in zip(expected, factors)])


def test_backbone_must_be_a_backbone():
    class Plain(nn.Module):
        def __init__(self, num_classes, image_shape):
            super().__init__()
            self.head = nn.Linear(3, num_classes)

    with pytest.raises(ConfigError, match=r"model.init_args.backbone = .*Plain: expected a manynets.networks.Backbone"):
        ClassifierModule(backbone=Plain, num_classes=3, image_shape=(1, 4, 4))


def test_training_loss_returns_loss_logits_and_their_labels():
    module = make_module()
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))
    loss, logits, targets = module.training_loss(x, y)
    assert torch.equal(targets, y) and logits.shape == (6, 3)
    assert loss.item() == pytest.approx(F.cross_entropy(module.network(x), y).item(), rel=1e-6)


# -- one evaluation path: named variants, members, several test sets ---------------------------------
class Variants(ClassifierModule):
    """Default prediction: two members (the network and its logits shifted per class); ``half``: the
    ensemble halved (B, C); ``pair``: the members doubled (M, B, C). Records the extras hook's calls.

    The -10 keeps every variant's logits outside [0, 1]: torchmetrics' calibration error takes a batch
    whose values all lie in [0, 1] for probabilities (no softmax), which tiny logits could trigger."""

    def __init__(self):
        super().__init__(backbone=TinyNet, num_classes=3, image_shape=(1, 4, 4))
        self.extras: list[tuple[int, list[str], int]] = []

    def predict_logits(self, images):
        logits = self.network(images)
        return torch.stack([logits, logits + torch.tensor([2.0, 0.0, -1.0]) - 10.0])

    def evaluation_logits(self, images):
        members = self.predict_logits(images)
        return {"": members, "half": members.mean(0) / 2, "pair": members * 2}

    def update_test_extras(self, dataloader_idx, variants, labels):
        self.extras.append((dataloader_idx, sorted(variants), labels.shape[0]))

    def extra_test_metrics(self, index):
        return {"own": torch.tensor(float(index))}


class TwoTestSets(__import__("lightning.pytorch", fromlist=["LightningDataModule"]).LightningDataModule):
    test_set_names = ["clean", "noise"]

    def __init__(self, sizes=(13, 9)):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.sets = [(torch.randn(s, 1, 4, 4, generator=g), torch.randint(0, 3, (s,), generator=g)) for s in sizes]

    def _loader(self, i):
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(*self.sets[i]), batch_size=4)

    def val_dataloader(self):
        return self._loader(0)

    def test_dataloader(self):
        return [self._loader(0), self._loader(1)]


def expected_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """acc, nll, brier of (B, C) or members (M, B, C) (ensemble = mean logits); member acc, disagreement."""
    members = logits if logits.ndim == 3 else None
    mean = logits.mean(0) if members is not None else logits
    p = np.exp(mean - mean.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out = {"acc": (p.argmax(1) == labels).mean(), "nll": -np.log(p[np.arange(len(labels)), labels]).mean(),
           "brier": ((p - np.eye(3)[labels]) ** 2).sum(1).mean(), "ece": ece_reference(p, labels)}  # fmt: skip
    if members is not None:
        preds = members.argmax(2)
        out.update({f"member{k}/acc": (pk == labels).mean() for k, pk in enumerate(preds)})
        out["ens_disagreement"] = (preds[0] != preds[1]).mean()
    return out


def _trainer(tmp_path):
    import lightning.pytorch as pl

    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, accelerator="cpu", devices=1)  # fmt: skip


def test_variants_are_logged_under_their_names_with_members_and_test_sets(tmp_path):
    torch.manual_seed(0)
    module, data = Variants(), TwoTestSets()
    trainer = _trainer(tmp_path)
    trainer.validate(module, datamodule=data, verbose=False)
    val = {k: v.item() for k, v in trainer.callback_metrics.items()}
    trainer.test(module, datamodule=data, verbose=False)
    test = {k: v.item() for k, v in trainer.callback_metrics.items()}

    module.eval()
    with torch.no_grad():
        per_set = [{k: v.double().numpy() for k, v in module.evaluation_logits(x).items()} for x, _ in data.sets]
    labels = [y.numpy() for _, y in data.sets]
    expected_val = {}
    for variant, logits in per_set[0].items():
        prefix = f"val/{variant}/" if variant else "val/"
        expected_val.update({prefix + k: v for k, v in expected_scores(logits, labels[0]).items() if "/" not in k
                             and k != "ens_disagreement"})  # fmt: skip
    assert set(val) == set(expected_val)  # validation: the ensemble metrics of every variant
    assert val == pytest.approx(expected_val, rel=1e-5, abs=1e-6)

    expected_test = {}
    for name, logits_by_variant, y in zip(data.test_set_names, per_set, labels):
        for variant, logits in logits_by_variant.items():
            prefix = f"test/{name}/{variant}/" if variant else f"test/{name}/"
            expected_test.update({prefix + k: v for k, v in expected_scores(logits, y).items()})
        expected_test[f"test/{name}/own"] = float(data.test_set_names.index(name))
    noise = {k[len("test/noise/"):]: v for k, v in expected_test.items() if k.startswith("test/noise/")}
    expected_test.update({f"test/mean/{k}": v for k, v in noise.items()})  # the mean over the shifted sets
    assert "test/clean/member1/acc" in expected_test and "test/noise/pair/ens_disagreement" in expected_test
    assert "test/clean/half/member0/acc" not in expected_test
    assert set(test) == set(expected_test)
    assert test == pytest.approx(expected_test, rel=1e-5, abs=1e-6)
    # the extras hook saw every batch of both sets with every variant
    batches = [(i, ["", "half", "pair"], len(b)) for i, (x, _) in enumerate(data.sets) for b in x.split(4)]
    assert module.extras == batches


def test_default_variant_keeps_todays_names_on_one_test_set(tmp_path):
    torch.manual_seed(0)
    module, data = make_module(), TwoTestSets()
    with torch.no_grad():
        module.network.head.bias -= 10.0  # logits outside [0, 1] (see Variants); the softmax is unchanged
    data.test_dataloader = data.val_dataloader
    trainer = _trainer(tmp_path)
    trainer.test(module, datamodule=data, verbose=False)
    assert set(trainer.callback_metrics) == {"test/acc", "test/nll", "test/ece", "test/brier"}
    module.eval()
    with torch.no_grad():
        logits = module.network(data.sets[0][0]).double().numpy()
    expected = {f"test/{k}": v for k, v in expected_scores(logits, data.sets[0][1].numpy()).items()}
    assert {k: v.item() for k, v in trainer.callback_metrics.items()} == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_evaluation_variants_are_checked():
    module = Variants().eval()
    batch = (torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,)))
    module.evaluation_logits = lambda images: {"n2": module.network(images)}
    with pytest.raises(RuntimeError, match="under the key ''"):
        module.validation_step(batch, 0)
    module.evaluation_logits = lambda images: {"": module.network(images), "a.b": module.network(images)}
    with pytest.raises(RuntimeError, match="a name without"):
        module.validation_step(batch, 0)
    module.evaluation_logits = lambda images: {"": module.network(images), "short": module.network(images)[:4]}
    with pytest.raises(RuntimeError, match=r"4 rows of evaluation logits \(variant 'short'"):
        module.validation_step(batch, 0)
