"""The figures of `vitslim search` (trajectory.png, pareto.png), read from the matplotlib Figure they
save: they show the data given, mark where the path starts and what was returned, draw the target and
the tightened bound the search used, and keep the legend off the data."""
import pytest

import nas.run
from nas.run import plot_pareto, plot_trajectory

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

TRAJ = [{"step": 0, "action": "start", "predicted_ms": 2.6, "acc": 0.27},
        {"step": 1, "action": "to_identity", "where": "stage0.block0", "predicted_ms": 2.3, "acc": 0.26},
        {"step": 2, "action": "meta3d_to_meta4d", "where": "stage2.block1", "predicted_ms": 1.9, "acc": 0.25},
        {"step": 3, "action": "shrink", "where": "stage0", "predicted_ms": 1.4, "acc": 0.2}]
ROWS = [{"number": i, "ms": ms, "acc": acc, "loss": 1.0, "feasible": ms <= 1.3}
        for i, (ms, acc) in enumerate([(0.8, 0.15), (1.1, 0.23), (1.25, 0.26), (1.2, 0.11), (1.45, 0.27), (1.6, 0.29)])]


@pytest.fixture
def saved(figures_of):
    """The figure each plot saves, drawn instead of written."""
    return figures_of(nas.run)


def _legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _vlines(ax):
    return {ln.get_label(): ln.get_xdata()[0] for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1}


def _points(ax, label):
    """The (x, y) of the scatter whose legend label starts with `label`."""
    hits = [c for c in ax.collections if c.get_label().startswith(label)]
    assert len(hits) == 1, [c.get_label() for c in ax.collections]
    return [tuple(p) for p in hits[0].get_offsets()]


def _plot(which, tmp_path, **kw):
    """The trajectory (returned: 1.4 ms, 0.2) or the Pareto plot (chosen: trial 2) with a 1.5 ms target."""
    if which == "trajectory":
        return plot_trajectory(TRAJ, 1.5, str(tmp_path / "t.png"), chosen=(1.4, 0.2, "end"), **kw)
    return plot_pareto(ROWS, {0, 1, 2}, 1.5, 2, str(tmp_path / "p.png"), **kw)


def test_the_trajectory_marks_its_start_and_the_network_returned(saved, tmp_path):
    assert plot_trajectory(TRAJ, 1.5, str(tmp_path / "t.png"), chosen=(1.4, 0.2, "end"))
    fig, kw = saved[-1]
    ax = fig.axes[0]
    path = next(ln for ln in ax.get_lines() if ln.get_label().startswith("slimming path"))
    assert list(path.get_xdata()) == [t["predicted_ms"] for t in TRAJ] and list(path.get_ydata()) == [t["acc"] for t in TRAJ]
    assert _points(ax, "start") == [(2.6, 0.27)]
    assert _points(ax, "returned") == [(1.4, 0.2)]
    assert any(t.startswith("start") for t in _legend(ax)) and any(t.startswith("returned (end)") for t in _legend(ax))
    assert not ax.xaxis_inverted()  # latency grows to the right, as on the Pareto plot and in the papers
    assert "ms" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()


def test_the_trajectory_names_the_spaces_width_step(saved, tmp_path):
    plot_trajectory(TRAJ, 1.5, str(tmp_path / "t.png"), width_step=32)
    assert "-32 channels" in saved[-1][0].axes[0].get_title()


@pytest.mark.parametrize("which", ["trajectory", "pareto"])
def test_the_target_and_a_tightened_bound_are_both_drawn(saved, tmp_path, which):
    assert _plot(which, tmp_path, bound_ms=1.3)
    lines = _vlines(saved[-1][0].axes[0])
    assert lines.get("target 1.5 ms") == 1.5
    assert [x for label, x in lines.items() if label.startswith("search bound 1.3 ms")] == [1.3]
    assert _plot(which, tmp_path, bound_ms=1.5)  # the bound is the target: one line
    assert list(_vlines(saved[-1][0].axes[0]).values()) == [1.5]


@pytest.mark.parametrize("which", ["trajectory", "pareto"])
def test_the_legend_lies_beside_the_axes_and_is_kept_in_the_image(saved, tmp_path, which):
    if which == "trajectory":
        plot_trajectory(TRAJ, 1.5, str(tmp_path / "t.png"), refined=[{"predicted_ms": 1.45, "acc": 0.21}],
                        chosen=(1.4, 0.2, "end"))
    else:
        plot_pareto(ROWS, {0, 1, 2}, 1.5, 2, str(tmp_path / "p.png"))
    fig, kw = saved[-1]
    ax = fig.axes[0]
    assert not _overlap(ax.get_legend().get_window_extent(), ax.get_window_extent())
    assert kw.get("bbox_inches") == "tight"


def test_the_pareto_plot_shows_the_trials_front_and_choice_given(saved, tmp_path):
    assert plot_pareto(ROWS, {0, 1, 2}, 1.3, 2, str(tmp_path / "p.png"), bound_ms=1.3)
    ax = saved[-1][0].axes[0]
    assert sorted(_points(ax, "trials within the bound") + _points(ax, "trials over the bound")) == sorted((r["ms"], r["acc"]) for r in ROWS)
    front = next(ln for ln in ax.get_lines() if ln.get_label().startswith("Pareto front"))
    assert list(zip(front.get_xdata(), front.get_ydata())) == [(0.8, 0.15), (1.1, 0.23), (1.25, 0.26)]
    assert _points(ax, "chosen") == [(1.25, 0.26)]
    assert "Optuna" in ax.get_title() and "6 trials" in ax.get_title()


@pytest.mark.parametrize("which", ["trajectory", "pareto"])
def test_the_returned_network_as_measured_is_drawn_beside_its_prediction(saved, tmp_path, which):
    acc = 0.2 if which == "trajectory" else ROWS[2]["acc"]
    assert _plot(which, tmp_path, measured_ms=1.55)
    ax = saved[-1][0].axes[0]
    assert _points(ax, "returned, measured: 1.55 ms (+3.3% vs target)") == [(1.55, acc)]
    assert ax.get_xlabel() == "predicted latency (ms); the open diamond: measured"
    assert _plot(which, tmp_path)  # not measured (verification off, or the table's device is elsewhere): no such mark
    assert not any(c.get_label().startswith("returned, measured") for c in saved[-1][0].axes[0].collections)
    assert saved[-1][0].axes[0].get_xlabel() == "predicted latency (ms)"


@pytest.mark.parametrize("which", ["trajectory", "pareto"])
def test_the_measured_mark_stays_visible_on_a_prediction_that_was_exact(saved, tmp_path, which):
    """Measured where it was predicted, the open diamond lies on the returned star: drawn under it, or in the
    star's own colour, it vanished (a search whose prediction was right looked unverified)."""
    x = 1.4 if which == "trajectory" else ROWS[2]["ms"]
    assert _plot(which, tmp_path, measured_ms=x)
    ax = saved[-1][0].axes[0]
    star = next(c for c in ax.collections if c.get_label().startswith(("returned (", "chosen")))
    diamond = next(c for c in ax.collections if c.get_label().startswith("returned, measured"))
    assert [tuple(p) for p in diamond.get_offsets()] == [tuple(p) for p in star.get_offsets()]
    assert diamond.get_zorder() > star.get_zorder()
    assert not matplotlib.colors.same_color(diamond.get_edgecolor()[0], star.get_facecolor()[0])
    assert diamond.get_sizes()[0] >= 0.9 * star.get_sizes()[0]  # its corners show round the star
