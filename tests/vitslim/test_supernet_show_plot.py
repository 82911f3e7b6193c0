"""The figure of `vitslim supernet show RUN --plot F`, read from the matplotlib Figure it saves: the
probabilities and stage importances of importance.json, one legend that covers no panel, and a stage
without importance (no identity candidate) drawn as n/a, not as 0."""
import pytest

import supernet.arch
from vitslim import cmd_supernet

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

IMP = {"step": 150, "tau": 0.5,
       "candidates": [["meta4d", "identity"], ["meta4d", "meta3d", "identity"], ["meta4d", "meta3d"]],
       "probabilities": [[[0.35, 0.65], [0.47, 0.53]],
                         [[0.37, 0.35, 0.28], [0.23, 0.53, 0.24], [0.33, 0.34, 0.33]],
                         [[0.6, 0.4], [0.45, 0.55]]],
       "metapath": [[0.54, 0.88], [2.57, 3.17, 2.03], [None, None]],
       "stage": [1.42, 7.77, None]}  # the last stage has no identity candidate


@pytest.fixture
def figure(figures_of, tmp_path):
    got = figures_of(supernet.arch)
    cmd_supernet._plot(IMP, str(tmp_path / "imp.png"))
    return got[-1]


def _overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_a_stage_without_importance_is_not_drawn_as_zero(figure):
    fig, _ = figure
    ax = fig.axes[-1]
    assert [(p.get_x() + p.get_width() / 2, p.get_height()) for p in ax.patches] == [(0, 1.42), (1, 7.77)]
    assert [(t.get_text(), t.get_position()[0]) for t in ax.texts] == [("n/a", 2)]
    assert ax.get_ylabel()  # says what importance is


def test_the_bars_are_the_probabilities_and_one_legend_covers_no_panel(figure):
    fig, kw = figure
    for ax, cands, probs in zip(fig.axes, IMP["candidates"], IMP["probabilities"]):
        assert ax.get_legend() is None  # not one per panel over the last block's bars
        tops = [p.get_y() + p.get_height() for p in ax.patches]
        want = [sum(p[:k + 1]) for k in range(len(cands)) for p in probs]  # each candidate stacked on the ones before
        assert tops == pytest.approx(want)
    assert len(fig.legends) == 1
    assert [t.get_text().split(" ")[0] for t in fig.legends[0].get_texts()] == ["I", "3D", "4D"]  # as stacked
    leg = fig.legends[0].get_window_extent()
    assert not any(_overlap(leg, ax.get_window_extent()) for ax in fig.axes)
    assert kw.get("bbox_inches") == "tight"  # the legend beside the panels is kept in the image
    assert "step 150" in fig._suptitle.get_text()


@pytest.mark.parametrize("imp", [
    5, [], {"candidates": 3}, {**IMP, "stage": IMP["stage"][:2]}, {**IMP, "tau": "hot"},
    {**IMP, "probabilities": [[[0.35, 0.65, 0.1], [0.47, 0.53]]] + IMP["probabilities"][1:]},
    {**IMP, "metapath": [["x", 0.88]] + IMP["metapath"][1:]},
])
def test_a_tampered_importance_json_is_refused_in_one_line(tmp_path, capsys, imp):
    """importance.json of a run directory from elsewhere was printed and plotted as it was: an AttributeError or
    TypeError traceback for anything else than what train writes."""
    import json
    from vitslim.cli import main
    (tmp_path / "importance.json").write_text(json.dumps(IMP))  # as train writes it: shown
    assert main(["supernet", "show", str(tmp_path)]) == 0 and "stage 2: importance n/a" in capsys.readouterr().out
    (tmp_path / "importance.json").write_text(json.dumps(imp))
    for extra in ([], ["--plot", str(tmp_path / "imp.png")]):
        assert main(["supernet", "show", str(tmp_path)] + extra) != 0
        err = capsys.readouterr().err
        assert "importance.json: not an importance record" in err and len(err.strip().splitlines()) == 1, err
