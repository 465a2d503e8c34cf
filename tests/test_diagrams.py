"""The book's diagrams: they draw, fit the text column, keep fonts readable, and the guidance tilt is right."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

from diffusion_rl import diagrams  # noqa: E402
from diffusion_rl.diffusion import NoiseSchedule  # noqa: E402
from diffusion_rl.models import UNetConfig  # noqa: E402


def _fonts(fig) -> list[float]:
    return [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text().strip()]


@pytest.mark.parametrize(
    "draw",
    [
        lambda: diagrams.markov_chain(),
        lambda: diagrams.markov_chain([np.zeros((5, 2))] * 5, symbol="x"),
        lambda: diagrams.temporal_unet(),
        lambda: diagrams.replan_timeline(),
        lambda: diagrams.tilted_distribution(),
        lambda: diagrams.plot_effective_tilt(NoiseSchedule(20)),
    ],
)
def test_diagrams_fit_the_column_with_readable_fonts(draw):
    fig = draw()
    fig.canvas.draw()
    assert fig.get_figwidth() <= diagrams.MAX_WIDTH_IN
    fonts = _fonts(fig)
    assert fonts and min(fonts) >= diagrams.MIN_FONT_PT
    plt.close(fig)


def test_temporal_unet_labels_follow_the_config():
    fig = diagrams.temporal_unet(UNetConfig(17, horizon=16, dim=8, dim_mults=(1, 2, 4, 8)))
    texts = {t.get_text() for t in fig.findobj(matplotlib.text.Text)}
    for label in ("8 x 16", "16 x 8", "32 x 4", "middle\n64 x 2"):
        assert label in texts, label
    plt.close(fig)


def test_replan_timeline_marks_one_replan_every_k_steps():
    fig = diagrams.replan_timeline(windows=(3,), horizon=8, steps=12)
    dots = [line for line in fig.axes[0].lines if line.get_marker() == "o" and len(line.get_xdata()) == 1]
    assert sorted(float(d.get_xdata()[0]) for d in dots) == [0, 3, 6, 9]
    executed = [p for p in fig.axes[0].patches if p.get_facecolor()[:3] == matplotlib.colors.to_rgb("tab:blue")]
    assert len(executed) == 4 * 3
    plt.close(fig)
    with pytest.raises(ValueError, match="1..8"):
        diagrams.replan_timeline(windows=(9,))


def test_effective_tilt_is_kappa_over_the_step_variance():
    s = NoiseSchedule(20)
    tilt = diagrams.effective_tilt(s, 0.3, t_stopgrad=2)
    assert np.isnan(tilt[:2]).all()
    var = s.posterior_variance.double().numpy()
    np.testing.assert_allclose(tilt[2:], 0.3 / var[2:])
    # It grows towards the end of the chain: from about kappa at pure noise to dozens of times more.
    assert tilt[-1] == pytest.approx(0.3 / var[-1]) and 0.29 < tilt[-1] < 0.31
    assert tilt[2] / tilt[-1] > 50
    assert np.isnan(diagrams.effective_tilt(s, 0.3)[0])  # the last step adds no noise: no tilt is defined


def test_book_style_sets_readable_defaults():
    with matplotlib.rc_context():
        diagrams.book_style()
        rc = matplotlib.rcParams
        assert rc["figure.figsize"][0] <= diagrams.MAX_WIDTH_IN and rc["figure.dpi"] == 100
        for key in ("font.size", "axes.titlesize", "axes.labelsize", "xtick.labelsize", "legend.fontsize"):
            assert float(rc[key]) >= diagrams.MIN_FONT_PT, key
