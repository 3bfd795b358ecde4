"""Every figure manynets draws can go into a paper as it is (issue 13, item 9): a title naming the run,
axis labels (units on the value axis), readable layer names, legends that exist where several series
share an axes and sit outside the data. Checked on the matplotlib Figure before it is saved."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from manynets.analysis.outputs import layer_label, layer_labels, read_csv, write_csv  # noqa: E402
from manynets.analysis.pca import plot_delta_sweep  # noqa: E402
from manynets.analysis.probes import plot_probes  # noqa: E402
from manynets.analysis.receptive_field import plot_receptive_fields, receptive_fields  # noqa: E402
from manynets.analysis.reliability import ReliabilityBins, plot_reliability  # noqa: E402
from manynets.analysis.saturation import plot_saturation, plot_saturation_heatmap  # noqa: E402
from manynets.analysis.subspace_plots import sweep_figures  # noqa: E402
from manynets.report import accuracy_vs_n_figure, ensemble_vs_members_figure  # noqa: E402

RUN = "myrun"
LAYERS = ["stem", "body-0-conv1", "body-0-conv2", "body-1-conv1", "head"]


def check_figure(fig, run: str = RUN) -> None:
    """Title with the run's name; x and y labels on every data axes (y with a unit); legends outside."""
    fig.canvas.draw()
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    titles = [fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in axes]
    assert any(run in t for t in titles), titles
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None] + list(fig.legends)
    explained = {t.get_text() for legend in legends for t in legend.get_texts()}
    for ax in axes:
        siblings = ax.get_shared_x_axes().get_siblings(ax)
        assert any(s.get_xlabel() for s in siblings), f"no x label: {ax.get_title()!r}"
        assert ax.get_ylabel() and "(" in ax.get_ylabel(), f"y label without unit: {ax.get_ylabel()!r}"
        labelled = [h for h in ax.get_legend_handles_labels()[1] if not h.startswith("_")]
        if len(labelled) > 1:  # several series: a legend of the figure names each of them
            assert set(labelled) <= explained, f"series {labelled} without a legend: {ax.get_title()!r}"
        legend = ax.get_legend()
        if legend is not None:
            box, frame = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
            assert box.x0 >= frame.x1 - 1 or box.y0 >= frame.y1 - 1 or box.x1 <= frame.x0 + 1, "legend over the data"
    plt.close(fig)


def test_layer_labels_are_module_paths_shortened_once():
    assert layer_label("body-0-conv1") == "body.0.conv1" and layer_label("head") == "head"
    assert layer_label("members-0-body-3-block-conv1") == "members.\u2026.block.conv1"
    labels = layer_labels(["members-0-body-3-block-conv1", "members-1-body-3-block-conv1", "stems-1"])
    assert len(set(labels)) == 3 and labels[2] == "stems.1"


def test_saturation_bars_and_heatmap():
    by_mode = {m: {n: 0.1 * i + d for i, n in enumerate(LAYERS)} for m, d in (("train", 0.0), ("eval", 0.05))}
    fig = plot_saturation(by_mode, LAYERS, f"{RUN}: saturation, epoch 1")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == layer_labels(LAYERS)
    check_figure(fig)
    rows = [{"epoch": e, **{f"saturation/{m}/{n}": 0.1 * i + 0.01 * e for m in ("train", "eval") for i, n in
                            enumerate(LAYERS)}} for e in range(3)]  # fmt: skip
    fig = plot_saturation_heatmap(rows, f"{RUN}: saturation per epoch and layer")
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (3, len(LAYERS)) and image[2, 1] == pytest.approx(0.12)
    check_figure(fig)


def test_saturation_heatmap_from_csv(tmp_path):
    """The heatmap reads saturation.csv back (strings, units stripped, a 0 saturation stays 0)."""
    rows = [{"epoch": e, "saturation/train/stem": 0.0, "idim/train/stem": 0} for e in range(2)]
    write_csv(tmp_path / "saturation.csv", rows, {"saturation": "fraction", "idim": "dimensions"})
    fig = plot_saturation_heatmap(read_csv(tmp_path / "saturation.csv"), f"{RUN}: saturation")
    assert fig.axes[0].images[0].get_array().tolist() == [[0.0], [0.0]]
    check_figure(fig)


def test_probe_figure():
    results = {n: {"train": 0.5 + 0.1 * i, "test": 0.4 + 0.1 * i, "ref_test": 0.41 + 0.1 * i} for i, n in
               enumerate(LAYERS)}  # fmt: skip
    fig = plot_probes(results, f"{RUN}: linear probe accuracy per layer")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["test split", "training split", "test split, scikit-learn reference"]
    check_figure(fig)


def test_reliability_figure():
    bins = ReliabilityBins()
    bins.update(torch.randn(200, 10) * 3, torch.randint(0, 10, (200,)))
    check_figure(plot_reliability(bins.rows(), f"{RUN}: reliability diagram"))


def test_subspace_figures():
    line = [{"point": f"{a:g}", "alpha": a, **{f"{p}{m}": 0.9 - 0.1 * abs(a - 0.5) for p in ("", "pair_")
             for m in ("acc", "nll", "ece")}, "pair_tv": 0.1, "pair_feature_cos2": 0.9}
            for a in (0.0, 0.25, 0.5, 0.75, 1.0)]  # fmt: skip
    for fig in sweep_figures(line, "line", RUN).values():
        check_figure(fig)
    points = [{"point": n, "acc": 0.9} for n in ("vertex0", "vertex1", "vertex2", "centroid", "random0", "random1")]
    ensembles = [{"point": "ensemble_vertices", "members": 3, "acc": 0.93},
                 {"point": "ensemble_random2", "members": 2, "acc": 0.92}]  # fmt: skip
    check_figure(sweep_figures(points + ensembles, "simplex", RUN)["subspace_simplex"])


def test_report_figures():
    rows = [{"run": RUN, "test/acc": 0.9, "test/n1/acc": 0.95, "test/n2/acc": 0.9},
            {"run": "other", "test/acc": 0.93, "test/member0/acc": 0.9, "test/member1/acc": 0.91}]  # fmt: skip
    check_figure(accuracy_vs_n_figure(rows))
    check_figure(ensemble_vs_members_figure(rows), run="other")
    assert accuracy_vs_n_figure(rows[1:]) is None and ensemble_vs_members_figure(rows[:1]) is None
    assert not math.isnan(rows[0]["test/acc"])


def test_receptive_field_figure():
    from manynets.networks import VGG

    rows = receptive_fields(VGG(10, (3, 32, 32), depth=11, width_divisor=16), (3, 32, 32))
    fig = plot_receptive_fields(rows, 32, f"{RUN}: receptive field per conv layer")
    assert len(fig.axes[0].patches) == sum(r.kind == "Conv2d" for r in rows)
    check_figure(fig)


def test_pca_sweep_figure():
    rows = [{"delta": d, "accuracy": 0.5 + 0.4 * d, "random_accuracy": 0.3, "sum_id": 100 * d, "sum_width": 120}
            for d in (0.9, 0.99, 0.999)] + [{"delta": 3.0, "accuracy": 0.95, "sum_id": 120, "sum_width": 120}]  # fmt: skip
    check_figure(plot_delta_sweep(rows, f"{RUN}: PCA projection sweep"))
