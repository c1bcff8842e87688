"""The user guide's plots, computed by the docs build from the library's own code (never a static
image): each function returns a PNG's bytes. Small and seeded, a few seconds on one CPU core."""

from __future__ import annotations

import io

import torch
from torch import nn

from rethinkbn import GhostBatchNorm, ema_report, precise_bn


def _png(fig: object) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return buf.getvalue()


def nbs_inconsistency() -> bytes:
    """Train/test inconsistency against the normalization batch size: the RMS difference between
    a GhostBatchNorm's training-mode output (each group of NBS samples normalized with its own
    statistics) and its eval-mode output (population statistics from ``precise_bn``), on the same
    512 samples, relative to the output's RMS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    x = torch.randn(512, 16, 8) * torch.rand(1, 16, 1) * 3 + torch.randn(1, 16, 1)
    sizes = [2, 4, 8, 16, 32, 64, 128, 512]
    gaps = []
    for k in sizes:
        bn = GhostBatchNorm(16, norm_batch_size=k)
        precise_bn(bn, [x], num_samples=512, progress=False)
        with torch.no_grad():
            train, test = bn.train()(x), bn.eval()(x)
        gaps.append(float((train - test).pow(2).mean().sqrt() / test.pow(2).mean().sqrt()))
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(sizes, gaps, marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(k) for k in sizes])
    ax.set_xlabel("normalization batch size (NBS)")
    ax.set_ylabel("relative RMS(train - eval output)")
    ax.set_title("GhostBatchNorm: training vs population statistics", fontsize=10)
    ax.grid(alpha=0.3)
    return _png(fig)


def ema_vs_population() -> bytes:
    """How far the EMA (running) statistics of a small network trained with SGD are from the
    population statistics of its current weights (``ema_report``: RMS mean shift in sigmas over
    the channels of every BatchNorm layer), for torch's momentum 0.1 and 0.01."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for momentum in (0.1, 0.01):
        torch.manual_seed(0)
        x = torch.randn(2048, 8) * 2 + 1
        y = (x[:, :4].sum(1) > 4).long()
        model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32, momentum=momentum), nn.ReLU(),
                              nn.Linear(32, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        data = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 2048, 64)]
        steps, shifts = [], []
        for step in range(1, 201):
            xb, yb = data[step % len(data)]
            model.train()
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            if step % 10 == 0:
                report = ema_report(model, data, num_samples=1024, progress=False)
                steps.append(step)
                shifts.append(max(float(r.mean_shift) for r in report.layers.values()))
        ax.plot(steps, shifts, label=f"momentum {momentum}")
    ax.set_xlabel("SGD step")
    ax.set_ylabel("EMA mean shift (sigmas)")
    ax.set_title("EMA vs population statistics during training", fontsize=10)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return _png(fig)


PLOTS = {"guide/img/nbs_inconsistency.png": nbs_inconsistency,
         "guide/img/ema_vs_population.png": ema_vs_population}
