"""Report: a diagnosis as a terminal table, markdown, JSON and a plot.

Stage 3 of :func:`~rethinkbn.diagnosis.diagnose`: :class:`Diagnosis` holds the findings and the
numbers; it only formats them (every sentence was written by the judge from a number).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..population import markdown_table
from ._records import Finding, LayerDiagnosis, MetricKey, Thresholds

__all__ = ["Diagnosis"]

# the per-layer columns of the terminal table: the mechanism of Sec. 4 beside the distances
SUMMARY_COLUMNS = {"NBS": "norm_batch_size", "values/channel": "values_per_channel",
                   "between-sample share": "between_share", "E[var_k]/var": "variance_ratio",
                   "EMA shift": "ema_shift", "train/test gap": "train_test_gap"}


@dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` found: ``findings`` (most important first), the per-layer table,
    the model's metrics by :class:`MetricKey` (data and behaviour), the relative RMS of the
    outputs in training behaviour vs eval mode, the samples of the statistics pass over
    ``train_data``, the per-device training batch (the smallest rank's under
    torch.distributed) and the thresholds used.

    ``str()`` is the terminal summary; :meth:`to_markdown`, :meth:`to_dict` and :meth:`save` give
    the report, the JSON (metrics under their readable keys, ``str(MetricKey)``) and the files.
    """

    findings: list[Finding]
    layers: dict[str, LayerDiagnosis]
    metrics: dict[MetricKey, float | None]
    output_gap: float
    num_samples: int
    batch_size: int
    thresholds: Thresholds = field(default_factory=Thresholds)

    @property
    def problems(self) -> list[Finding]:
        """The findings to act on: problems and warnings."""
        return [f for f in self.findings if f.severity in ("problem", "warning")]

    def summary(self) -> str:
        """One line per finding, most important first, in a fixed-width table; the
        recommendations; then one line per layer (its NBS and the mechanism's numbers)."""
        rows = [(f.severity, f.check, f.layer or "(model)", _fmt(f.value), _fmt(f.threshold),
                 f.message) for f in self.findings]
        lines = [f"rethinkbn diagnose: {len(self.problems)} finding(s) to act on, "
                 f"{len(self.layers)} BatchNorm layers, {self.num_samples} samples"]
        lines += _fixed_width([("severity", "check", "layer", "value", "threshold", "finding"),
                               *rows])
        lines += [f"  -> {f.layer or 'model'}: {f.recommendation}" for f in self.problems
                  if f.recommendation]
        layer_rows = [(name, *(_fmt(getattr(r, key)) for key in SUMMARY_COLUMNS.values()))
                      for name, r in self.layers.items()]
        return "\n".join(lines + _fixed_width([("layer", *SUMMARY_COLUMNS), *layer_rows]))

    __str__ = summary

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (NaN as null; metrics under ``str(MetricKey)``)."""
        return _json_safe({
            "format": "rethinkbn.Diagnosis/1",
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "thresholds": asdict(self.thresholds),
            "metrics": {str(key): value for key, value in self.metrics.items()},
            "output_gap": self.output_gap,
            "findings": [asdict(f) for f in self.findings],
            "layers": {name: asdict(row) for name, row in self.layers.items()},
        })

    def to_markdown(self, plot: str | None = None) -> str:
        """The report: findings, recommendations, metrics and the per-layer table."""
        findings = markdown_table("", ["severity", "check", "layer", "value", "threshold",
                                       "finding"],
                                  [[f.severity, f.check, f.layer or "(model)", _fmt(f.value),
                                    _fmt(f.threshold), f.message] for f in self.findings],
                                  right_aligned=False)
        recs = [f"- **{f.layer or 'model'}** ({f.check}): {f.recommendation}"
                for f in self.problems if f.recommendation]
        cols = list(LayerDiagnosis.__dataclass_fields__)
        layers = markdown_table("", ["layer", *cols], [
            [name, *(_fmt(getattr(r, c)) for c in cols)] for name, r in self.layers.items()])
        out = ["# BatchNorm diagnosis", "",
               f"{self.num_samples} samples per pass; per-device training batch "
               f"{self.batch_size}. Thresholds: {asdict(self.thresholds)}.", "",
               "## Findings", "", findings, "", "## Recommendations", "", *(recs or ["- none"]),
               "", "## Model", "", *(f"- {k}: {_fmt(v)}" for k, v in self.metrics.items()),
               f"- output gap, training behaviour vs eval mode (relative RMS): "
               f"{_fmt(self.output_gap)}", "", "## Layers", "", layers]
        if plot:
            out += ["", f"![per-layer distances]({plot})"]
        return "\n".join(out) + "\n"

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``report.md``, ``diagnosis.json`` and ``layer_distances.png`` (the plot only when
        matplotlib is installed) to ``out_dir``; returns the paths written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "diagnosis.json"]
        written[0].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        plot = _plot(self, out / "layer_distances.png")
        if plot is not None:
            written.append(plot)
        report = out / "report.md"
        report.write_text(self.to_markdown(plot.name if plot else None))
        return [report, *written]


def _fixed_width(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells padded to their columns' widths; the last column is not padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]])
            for r in rows]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


PLOTTED = {  # label -> how to read it off a layer's row
    "EMA vs population: mean shift (sigma)": lambda r: r.ema_shift,
    "EMA vs population: |log std ratio|": lambda r: r.ema_log_std,
    "train/test gap at the training NBS (sigma)": lambda r: r.train_test_gap,
    "expected variance bias at the training NBS, 1 - E[var_k]/var": lambda r: 1 - r.variance_ratio,
    "train vs eval domain: mean shift (sigma)": lambda r: r.domain_shift,
    "train vs eval domain: |log std ratio|": lambda r: r.domain_log_std,
}


LABEL_CHARS = 24  # a layer's tick label: its qualified name, shortened to this many characters


def short_label(index: int, name: str, width: int = LABEL_CHARS) -> str:
    """The plot's tick label of layer ``index`` named ``name``: ``"3 layer2.0.bn1"``, with the
    name's start cut (``"..."``) to fit ``width`` characters (the end names the layer)."""
    text = f"{index} {name}"
    return text if len(text) <= width else f"{index} ...{name[-(width - len(str(index)) - 4):]}"


def _figure(diagnosis: Diagnosis) -> Any:
    """The per-layer distances as a matplotlib ``Figure``: one marker per layer and distance
    (layers are categories: no connecting line; the distances side by side at each layer),
    short rotated labels, the legend outside the axes, on the right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(diagnosis.layers)
    fig = Figure(figsize=(max(10.0, 0.4 * len(names) + 7), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    floor = 1e-4  # a log axis: smaller distances are drawn at the floor
    drawn = [(label, [abs(read(diagnosis.layers[n])) for n in names])
             for label, read in PLOTTED.items()]
    drawn = [(label, values) for label, values in drawn if any(math.isfinite(v) for v in values)]
    width = 0.7 / max(1, len(drawn))
    for i, (label, values) in enumerate(drawn):
        offset = (i - (len(drawn) - 1) / 2) * width
        ax.plot([x + offset for x in range(len(names))], [max(v, floor) for v in values],
                ls="none", marker="os^vDP"[i % 6], ms=5, label=label)
    t = diagnosis.thresholds
    ax.axhline(t.shift, color="grey", ls="--", lw=1, label=f"threshold {t.shift} (EMA, gap)")
    if any(math.isfinite(r.variance_ratio) for r in diagnosis.layers.values()):
        ax.axhline(t.variance_bias, color="grey", ls="-.", lw=1,
                   label=f"threshold {t.variance_bias} (variance bias)")
    if any(math.isfinite(r.domain_shift) for r in diagnosis.layers.values()):
        ax.axhline(t.domain_shift, color="grey", ls=":", lw=1,
                   label=f"threshold {t.domain_shift} (domain)")
    ax.set_xticks(range(len(names)), [short_label(i, n) for i, n in enumerate(names)],
                  rotation=45, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.grid(axis="x", color="0.9", lw=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("BatchNorm layer (index, qualified name)")
    ax.set_ylabel("distance")
    ax.set_title("Per-layer BatchNorm distances")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def _plot(diagnosis: Diagnosis, path: Path) -> Path | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    _figure(diagnosis).savefig(path, dpi=110, bbox_inches="tight")
    return path
