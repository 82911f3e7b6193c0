"""The reallocation plot of `vitslim prune` (kept fraction per block of each unit kind), read from the
matplotlib Figure it saves: it shows the report's numbers, names its blocks as the report does, and
nothing (legend, stage names) covers or clips the data."""
import copy
import math

import pytest

import vitslim
from pruning import report as report_mod
from pruning.pruner import per_block
from supernet.arch import PLOT_COLOURS

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def _report(preset, family):
    """A prune report's plotted fields, from per_block (the report's own code) on a real preset and a
    copy with every block's widths cut by a different amount."""
    before = vitslim.get_preset(preset)
    after = copy.deepcopy(before)
    j = 0
    for st in after["stages"]:
        for b in st["blocks"]:
            b["heads"] = max(1, b["heads"] - j % 2)
            b["qk_dim"] = max(1, b["qk_dim"] // (1 + j % 3))
            b["v_dim"] = max(1, b["v_dim"] - 4 * j)
            b["ffn_hidden"] = max(1, b["ffn_hidden"] // 2 + 7 * j)
            j += 1
    return {"blocks": per_block(before, after), "family": family, "target": "macs=0.5", "prune_embed": False,
            "params_before": 100, "params_after": 50, "macs_before": 100, "macs_after": 49}


@pytest.fixture
def saved(figures_of, tmp_path):
    """plot_reallocation's figure and savefig arguments, drawn instead of written."""
    got = figures_of(report_mod)

    def plot(report):
        assert report_mod.plot_reallocation(report, str(tmp_path / "r.png")) is not None
        return got[-1]
    return plot


def _overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_the_plotted_values_are_the_reports_kept_fractions(saved):
    rep = _report("swin_tiny", "swin")
    fig, _ = saved(rep)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    assert set(lines) == {label for _, label in report_mod.KIND_LABELS}
    for k, label in report_mod.KIND_LABELS:
        ys = lines[label].get_ydata()
        assert len(ys) == len(rep["blocks"]) == 12
        assert all(math.isclose(y, b["kept"][k]) for y, b in zip(ys, rep["blocks"]))
    assert len({ln.get_color() for ln in lines.values()}) == 4 and len({ln.get_marker() for ln in lines.values()}) == 4
    assert {ln.get_color() for ln in lines.values()} <= set(PLOT_COLOURS.values())  # colour-blind-safe


def test_the_legend_lies_outside_the_axes_and_is_kept_in_the_image(saved):
    for preset, family in (("deit_tiny", "deit"), ("swin_tiny", "swin")):
        fig, kw = saved(_report(preset, family))
        ax = fig.axes[0]
        leg = ax.get_legend()
        assert leg is not None and not _overlap(leg.get_window_extent(), ax.get_window_extent())
        assert kw.get("bbox_inches") == "tight"  # a legend beside the axes is not cut off the saved image


def test_a_deit_names_its_twelve_blocks_without_decimal_like_labels(saved):
    rep = _report("deit_tiny", "deit")
    rep["latency_kept"] = 0.613
    fig, _ = saved(rep)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(12)]  # not 0.1 ... 0.10, 0.11
    assert "DeiT" in ax.get_title() and "macs=0.5" in ax.get_title() and "predicted latency 0.61" in ax.get_title()
    assert not [t for t in ax.texts if t.get_text().startswith("stage")]  # one stage: nothing to name


def test_a_swin_marks_and_names_its_stages(saved):
    rep = _report("swin_tiny", "swin")  # 2/2/6/2 blocks
    fig, _ = saved(rep)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(b["block"]) for b in rep["blocks"]]
    bounds = sorted(ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_label().startswith("_"))
    assert bounds == [1.5, 3.5, 9.5]
    names = {t.get_text(): t for t in ax.texts}
    assert set(names) == {"stage 0", "stage 1", "stage 2", "stage 3"}
    assert names["stage 2"].get_position()[0] == pytest.approx(6.5)  # centred over blocks 4..9
    title = ax.title.get_window_extent()
    assert not any(_overlap(t.get_window_extent(), title) for t in ax.texts)


def test_an_emptied_attention_is_drawn_in_full_at_zero(saved):
    rep = _report("deit_tiny", "deit")
    b = rep["blocks"][3]
    b["kept"].update(heads=0.0, qk=0.0, v=0.0)  # what --depth reports for an attention it removed
    fig, _ = saved(rep)
    ax = fig.axes[0]
    assert ax.get_ylim()[0] < 0 and ax.get_ylim()[1] > 1  # not half a marker under the x axis
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert lines["heads"].get_ydata()[3] == 0.0
