"""The book's explanatory diagrams, drawn with matplotlib so they build offline with the pages.

Each function returns a figure drawn at most 7 inches wide with fonts of at least 9 pt, so that at
the book's column width (about 7 inches at 100 dpi) no text is scaled below 9 pt:

* :func:`markov_chain` - the forward process q and the reverse process p_theta as a chain of levels;
* :func:`temporal_unet` - the denoiser's shapes from a :class:`~diffusion_rl.models.UNetConfig`;
* :func:`replan_timeline` - which actions of each plan run for an executed window k < H;
* :func:`tilted_distribution` - a 2-D density and its tilt by exp(lambda V), as guidance asks;
* :func:`effective_tilt` / :func:`plot_effective_tilt` - the study's fixed kappa seen as the tilt kappa / Sigma_t.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffusion_rl.diffusion import NoiseSchedule

__all__ = [
    "MAX_WIDTH_IN",
    "MIN_FONT_PT",
    "book_style",
    "effective_tilt",
    "markov_chain",
    "plot_effective_tilt",
    "replan_timeline",
    "temporal_unet",
    "tilted_distribution",
]

MAX_WIDTH_IN = 7.0
"""Widest figure, in inches, that the book's text column shows at full size (about 700 px at 100 dpi)."""
MIN_FONT_PT = 9.0
"""Smallest font, in points, any diagram uses."""

_FONT = 10


def book_style() -> None:
    """Matplotlib defaults for the chapters: 100 dpi, text of 9-10 pt, figures no wider than the column."""
    import matplotlib as mpl

    mpl.rcParams.update({
        "figure.dpi": 100,
        "figure.figsize": (MAX_WIDTH_IN, 3.0),
        "font.size": 9.5,
        "axes.titlesize": 10,
        "axes.labelsize": 9.5,
        "xtick.labelsize": MIN_FONT_PT,
        "ytick.labelsize": MIN_FONT_PT,
        "legend.fontsize": MIN_FONT_PT,
        "figure.titlesize": 10.5,
    })


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _box(ax, x: float, y: float, w: float, h: float, text: str, colour: str = "#dbe8f6", fs: float = _FONT, **kw) -> None:
    """A rounded box centred at (x, y) with centred text."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=colour, ec="0.3", lw=1, **kw))
    ax.text(x, y, text, ha="center", va="center", fontsize=fs)


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], colour: str = "0.2", rad: float = 0.0,
           ls: str = "-", lw: float = 1.3) -> None:
    """An arrow from start to end, optionally curved by ``rad``."""
    ax.annotate("", xy=end, xytext=start,
                arrowprops=dict(arrowstyle="-|>", color=colour, lw=lw, ls=ls, shrinkA=2, shrinkB=2,
                                connectionstyle=f"arc3,rad={rad}"))


def markov_chain(snapshots: Sequence[np.ndarray] | None = None, symbol: str = r"\tau"):
    """The forward chain q (left to right, adds noise) and the learned reverse chain p_theta (right to left).

    ``snapshots``: optional 2-D point clouds (N, 2), one per drawn node (default nodes: x^0, x^1,
    x^{t-1}, x^t, x^T), drawn inside the nodes so the reader sees the data dissolve. ``symbol``
    names the variable (the book's trajectories are tau, the toy's points x).
    """
    plt = _plt()
    labels = [f"${symbol}^{{{i}}}$" for i in ("0", "1", "t-1", "t", "T_d")]
    n = len(labels)
    if snapshots is not None and len(snapshots) != n:
        raise ValueError(f"got {len(snapshots)} snapshots for {n} nodes")
    fig, ax = plt.subplots(figsize=(7.0, 2.9))
    ax.set(xlim=(-0.6, n - 0.4), ylim=(-1.45, 1.45), aspect="equal")
    ax.axis("off")
    xs = np.arange(n, dtype=float)
    for i, (x, lab) in enumerate(zip(xs, labels)):
        ax.add_patch(plt.Circle((x, 0), 0.36, fc="white", ec="0.2", lw=1.2))
        if snapshots is not None:
            inset = ax.inset_axes([x - 0.3, -0.3, 0.6, 0.6], transform=ax.transData)
            pts = np.asarray(snapshots[i])
            inset.scatter(pts[:, 0], pts[:, 1], s=1, color="tab:blue", alpha=0.5)
            inset.set(xlim=(-3, 3), ylim=(-3, 3), xticks=[], yticks=[])
            inset.axis("off")
            ax.text(x, -0.5, lab, ha="center", va="top", fontsize=12)
        else:
            ax.text(x, 0, lab, ha="center", va="center", fontsize=12)
    gaps = {1: r"$\cdots$", n - 2: r"$\cdots$"} if n >= 5 else {}
    for i in range(n - 1):
        if i in gaps:
            ax.text(xs[i] + 0.5, 0, gaps[i], ha="center", va="center", fontsize=12)
            continue
        _arrow(ax, (xs[i] + 0.3, 0.3), (xs[i + 1] - 0.3, 0.3), colour="tab:blue", rad=-0.45)
        _arrow(ax, (xs[i + 1] - 0.3, -0.3), (xs[i] + 0.3, -0.3), colour="tab:red", rad=-0.45)
    mid = xs[2] + 0.5 if n >= 5 else 0.5
    v = symbol
    ax.text(mid, 0.95, rf"forward $q({v}^t \mid {v}^{{t-1}}) = \mathcal{{N}}(\sqrt{{\alpha_t}}\,{v}^{{t-1}}, \beta_t I)$: fixed, adds noise",
            ha="center", fontsize=_FONT, color="tab:blue")
    ax.text(mid, -1.15, rf"reverse $p_\theta({v}^{{t-1}} \mid {v}^t)$: learned, removes noise (the sampler)",
            ha="center", fontsize=_FONT, color="tab:red")
    ax.text(xs[0], 0.62, "data", ha="center", fontsize=9, color="0.3")
    ax.text(xs[-1], 0.62, r"$\mathcal{N}(0, I)$", ha="center", fontsize=9, color="0.3")
    fig.tight_layout()
    return fig


def temporal_unet(cfg=None):
    """The temporal U-Net as boxes: each level's (channels x horizon), the skips, and where t enters.

    ``cfg`` is a :class:`~diffusion_rl.models.UNetConfig` (default: the shipped planner's shapes,
    23 dims, H = 8, dim 32, mults 1-2-4).
    """
    from diffusion_rl.models import UNetConfig

    plt = _plt()
    cfg = UNetConfig(23, 8, 32, (1, 2, 4)) if cfg is None else cfg
    chans = [cfg.dim * m for m in cfg.dim_mults]
    horizons = [cfg.horizon // 2**i for i in range(len(chans))]
    n = len(chans)
    step = 1.4
    xd = [1.2 + step * i for i in range(n)]  # the way down, level i at height -i
    x_mid = xd[-1] + 1.7
    xu = [x_mid + 1.7 + step * (n - 2 - i) for i in range(n - 1)]  # the way up, level i mirrors xd[i]
    right = (xu[0] if xu else x_mid) + 1.2
    fig, ax = plt.subplots(figsize=(7.0, 3.9))
    ax.set(xlim=(0, right), ylim=(-n - 1.1, 1.75))
    ax.axis("off")
    bw, bh = 1.15, 0.55
    _box(ax, xd[0], 1.05, 1.35, 0.6, f"input $\\tau^t$\n{cfg.transition_dim} x {cfg.horizon}", "#f3f3f3")
    _arrow(ax, (xd[0], 0.75), (xd[0], 0.28))
    for i, (c, h) in enumerate(zip(chans, horizons)):
        _box(ax, xd[i], -i, bw, bh, f"{c} x {h}", "#dbe8f6")
        if i < n - 1:
            _arrow(ax, (xd[i] + 0.25, -i - 0.28), (xd[i + 1] - 0.25, -i - 0.72))  # down: halve H
    _box(ax, x_mid, -(n - 1), bw, bh, f"middle\n{chans[-1]} x {horizons[-1]}", "#e6f2dd")
    _arrow(ax, (xd[-1] + bw / 2, -(n - 1)), (x_mid - bw / 2, -(n - 1)))
    for i in range(n - 1):
        _box(ax, xu[i], -i, bw, bh, f"{chans[i]} x {horizons[i]}", "#f6e3d6")
        _arrow(ax, (xd[i] + bw / 2, -i), (xu[i] - bw / 2, -i), colour="0.5", ls="--")  # skip connection
        below = (x_mid, -(n - 1)) if i == n - 2 else (xu[i + 1], -(i + 1))
        _arrow(ax, (below[0] + 0.25, below[1] + 0.28), (xu[i] - 0.25, -i - 0.28))  # up: double H
    if xu:
        _box(ax, xu[0], 1.05, 1.35, 0.6, f"output $\\hat\\tau^0$\n{cfg.transition_dim} x {cfg.horizon}", "#f3f3f3")
        _arrow(ax, (xu[0], 0.28), (xu[0], 0.75))
    ax.text((xd[0] + right) / 2 - 0.4, -0.45, "skip connections (dashed): the way up\nreceives the way down's fine detail",
            ha="center", va="center", fontsize=9, color="0.35")
    ax.text(0.1, -n + 0.25, "down: residual blocks of 1-D\nconvolutions over time, then H / 2", ha="left", va="top", fontsize=9)
    ax.text(right - 0.1, -n + 0.25, "up: H x 2, then\nresidual blocks", ha="right", va="top", fontsize=9)
    _box(ax, right / 2, -n - 0.65, 7.2, 0.5, "noise level t -> sinusoidal embedding -> added in every residual block",
         "#fff6cc", fs=9)
    ax.text(right / 2, 1.6, "boxes: channels x horizon", ha="center", fontsize=9, color="0.35")
    fig.tight_layout()
    return fig


def replan_timeline(windows: Sequence[int] = (1, 3, 8), horizon: int = 8, steps: int = 12):
    """For each executed window k: the plans made at steps 0, k, 2k, ... and which of their H actions run.

    A plan is a bar of H steps from the step it is made at; its first k cells (executed) are solid,
    the rest (planned, never executed) pale. A dot marks each replan from the real state.
    """
    plt = _plt()
    from matplotlib.patches import Rectangle

    if any(not 1 <= k <= horizon for k in windows):
        raise ValueError(f"every window must be in 1..{horizon}, got {list(windows)}")
    heights = {k: len(range(0, steps, k)) for k in windows}
    total = sum(heights[k] + 1.2 for k in windows)
    fig, ax = plt.subplots(figsize=(7.0, min(1.0 + 0.16 * total, 7.5)))
    y = 0.0
    for k in windows:
        y_top = y
        ax.text(-0.6, y - 0.4, f"k = {k}", ha="right", va="center", fontsize=10, fontweight="bold")
        for start in range(0, steps, k):
            for r in range(horizon):
                if start + r >= steps + horizon - 1:
                    break
                executed = r < k
                ax.add_patch(Rectangle((start + r, y - 0.8), 1, 0.7, fc="tab:blue" if executed else "#c9dcef",
                                       ec="white", lw=0.8, alpha=1.0 if executed else 0.8))
            ax.plot(start, y - 0.45, "o", color="tab:red", ms=4, zorder=3)
            y -= 1.0
        y -= 1.2
        ax.axhline(y + 0.6, color="0.85", lw=0.8)
        _ = y_top
    ax.set(xlim=(-0.2, steps + horizon - 0.8), ylim=(y + 0.5, 0.4), yticks=[])
    ax.set_xlabel("environment step", fontsize=10)
    ax.tick_params(labelsize=9)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    handles = [Rectangle((0, 0), 1, 1, fc="tab:blue"), Rectangle((0, 0), 1, 1, fc="#c9dcef"),
               plt.Line2D([], [], marker="o", color="tab:red", ls="", ms=5)]
    ax.legend(handles, ["executed action", "planned, never executed", "replan from the real state"],
              loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=9, frameon=False)
    ax.set_title(f"each row is one plan of H = {horizon} steps", fontsize=10, pad=24)
    fig.tight_layout()
    return fig


def tilted_distribution(lams: Sequence[float] = (0.0, 0.5, 2.0), direction: tuple[float, float] = (1.0, 0.5), data=None):
    """A 2-D mixture p(x) and its tilt p(x) exp(lambda V(x)) / Z for a linear value V(x) = w . x, per lambda.

    Guidance samples from the tilted density: modes where V is high gain weight, and within each
    mode the mass shifts up V's gradient; nothing is added where p is zero.
    """
    from diffusion_rl.toy import ToyData, density

    plt = _plt()
    data = ToyData() if data is None else data
    w = np.asarray(direction, dtype=float)
    g = np.linspace(-2.5, 2.5, 201)
    xx, yy = np.meshgrid(g, g)
    pts = torch.tensor(np.stack([xx.ravel(), yy.ravel()], 1), dtype=torch.float32)
    p = density(data, pts).numpy().reshape(xx.shape)
    v = w[0] * xx + w[1] * yy
    fig, axes = plt.subplots(1, len(lams), figsize=(7.0, 2.9), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, lam in zip(axes, lams):
        tilted = p * np.exp(lam * (v - v.max()))  # shifted exponent: the same density, no overflow
        tilted /= tilted.sum()
        ax.contourf(xx, yy, tilted, levels=12, cmap="Blues")
        ax.contour(xx, yy, v, levels=7, colors="tab:orange", linewidths=0.6, alpha=0.8)
        ax.annotate("", xy=(1.9 * w[0] / np.linalg.norm(w) * 0.5 + 0.9, -2.0 + 1.9 * w[1] / np.linalg.norm(w) * 0.5),
                    xytext=(0.9, -2.0), arrowprops=dict(arrowstyle="-|>", color="tab:orange", lw=1.5))
        ax.set(aspect="equal", xticks=[-2, 0, 2], yticks=[-2, 0, 2])
        ax.set_title(r"$p(x)$" if lam == 0 else rf"$p(x)\,e^{{{lam:g} V(x)}}$", fontsize=10)
        ax.tick_params(labelsize=9)
    axes[0].text(0.9, -2.35, r"$\nabla V$", color="tab:orange", fontsize=9)
    fig.suptitle("guidance tilts the data density towards high V (orange lines: V = const)", fontsize=10)
    fig.tight_layout()
    return fig


def effective_tilt(schedule: NoiseSchedule, kappa: float, t_stopgrad: int = 0) -> np.ndarray:
    """The tilt lambda_t = kappa / Sigma_t that a fixed step kappa grad V implies at each reverse step, shape (T,).

    Entry i belongs to the step from code level i (the study's t = i + 1); Sigma_t is that step's
    posterior variance. Steps without guidance (i < t_stopgrad) and the noiseless last step are NaN.
    """
    var = schedule.posterior_variance.double().cpu().numpy()
    tilt = np.full(len(var), np.nan)
    on = (np.arange(len(var)) >= t_stopgrad) & (var > 0)
    tilt[on] = kappa / var[on]
    return tilt


def plot_effective_tilt(schedule: NoiseSchedule, kappa: float = 0.3, t_stopgrad: int = 2):
    """Left: Sigma_t per reverse step; right: the implied tilt kappa / Sigma_t against Diffuser's constant lambda."""
    plt = _plt()
    t = np.arange(1, schedule.n_timesteps + 1)
    var = schedule.posterior_variance.double().cpu().numpy()
    tilt = effective_tilt(schedule, kappa, t_stopgrad)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(7.0, 2.9))
    ax0.semilogy(t[var > 0], var[var > 0], "o-", ms=3)
    ax0.set(xlabel="reverse step from level t", title=r"step variance $\Sigma_t = \tilde\beta_t$")
    ax1.semilogy(t, tilt, "o-", ms=3, color="tab:red", label=rf"study: fixed $\kappa$ = {kappa:g}, tilt $\kappa/\Sigma_t$")
    ax1.axhline(kappa, color="0.4", ls="--", lw=1, label=rf"Diffuser: step $\lambda\Sigma_t \nabla V$, tilt $\lambda$ = {kappa:g}")
    ax1.set(xlabel="reverse step from level t", title="effective tilt $\\lambda_t$")
    ax1.legend(fontsize=9, loc="upper left")
    for ax in (ax0, ax1):
        ax.invert_xaxis()  # the sampler runs from t = T_d down to 1
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=9)
        ax.title.set_size(10)
        ax.xaxis.label.set_size(10)
    fig.tight_layout()
    return fig
