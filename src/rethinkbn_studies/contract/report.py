"""Writes the reproduction's output: ``report.md`` and ``results.json``.

``report.md`` opens with a summary table of every study (claim, ours, paper, verdict), then one
section per study: its setup, our tables beside the paper's, its plots, and one verdict line per
claim with the criterion that decided it. ``results.json`` holds every study's numbers, tables,
verdicts and the environment (versions, device, threads, seeds, wall times).
"""

from __future__ import annotations

import json
import math
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rethinkbn.population import markdown_table

from . import variation as machine_variation
from .base import AGREES, DISAGREES, EXPLAINED, INCONCLUSIVE, NOT_TESTABLE, Study, StudyResult

__all__ = ["StudyOutcome", "environment", "render_report", "run_origin", "section",
           "untraced_numbers", "what_would_change", "write_outputs"]


@dataclass
class StudyOutcome:
    """One study's result (or its error message when it failed) and its wall time."""

    study: Study
    result: StudyResult | None
    seconds: float
    error: str | None = None


def environment(device: torch.device, seeds: tuple[int, ...], quick: bool,
                data: str) -> dict[str, Any]:
    """Versions, device and run settings, for results.json and the report's closing lines."""
    import numpy

    from rethinkbn import __version__

    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "rethinkbn": __version__,
    }
    try:
        from importlib.metadata import version

        versions["mnist1d"] = version("mnist1d")
    except Exception:  # the package may be absent when --data is a folder
        versions["mnist1d"] = None
    return {
        "versions": versions,
        "platform": platform.platform(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "seeds": list(seeds),
        "mode": "quick" if quick else "full",
        "data": data,
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _summary_table(outcomes: list[StudyOutcome],
                   builds: dict[tuple[str, str], str] | None) -> list[str]:
    rows: list[list[str]] = []
    extra = [] if builds is None else ["-"]
    for o in outcomes:
        if o.result is None:
            rows.append([f"`{o.study.name}`", f"(failed: {o.error})", "-", "-", "-", *extra])
            continue
        rows += [[f"`{o.study.name}`", row.claim, row.ours, row.paper, f"**{row.verdict.label}**",
                  *([] if builds is None else [builds[(o.study.name, row.claim)]])]
                 for row in o.result.summary]
    header = ["study", "claim", "ours", "paper", "verdict",
              *([] if builds is None else ["other builds"])]
    return markdown_table("", header, rows, right_aligned=False).split("\n")


def _verdicts(outcomes: list[StudyOutcome]) -> dict[tuple[str, str], str]:
    return {(o.study.name, r.claim): r.verdict.label for o in outcomes if o.result
            for r in o.result.summary}


def _variation_lines(variation: dict[str, Any] | None,
                     builds: dict[tuple[str, str], str] | None) -> list[str]:
    """The report's between-machine section: the variation's, a line saying that the folder's
    variation.json belongs to another run, or nothing when there is none."""
    if variation is None:
        return []
    if builds is None:
        ref = variation.get("reference", {})
        return ["## Between-machine variation", "",
                f"This folder's variation.json was measured on another run (commit "
                f"{ref.get('commit')}, {ref.get('started')}): its verdicts are not these. "
                "Rerun `" + str(variation.get("command")) + "` to measure this run's.", ""]
    return machine_variation.section(variation)


def _fingerprint_note(env: dict[str, Any]) -> str:
    fingerprint = env.get("data_fingerprint")
    return f" (content fingerprint {fingerprint})" if fingerprint else ""


def _cache_note(env: dict[str, Any]) -> str:
    cache = env.get("cache")
    if not cache:
        return ""
    return f" ({cache['misses']} runs computed, {cache['hits']} taken from the cache)"


def run_origin(env: dict[str, Any]) -> str | None:
    """When and from which commit the run of ``env`` was made (``"<started>, commit <c>"``),
    or None for an older results.json that lacks its command (the caller shows the command,
    ``env["command"]``, beside it)."""
    if not env.get("command"):
        return None
    commit = f", commit {env['commit']}" if env.get("commit") else ""
    return f"{env.get('started', '?')}{commit}"


def _run_note(env: dict[str, Any]) -> str:
    origin = run_origin(env)
    return "" if origin is None else f"Run {origin}: `{env['command']}`. "


def _ranks_note(env: dict[str, Any]) -> str:
    ranks = env.get("ranks", 1)
    return f"ranks: {ranks} real gloo processes (leakage), " if ranks > 1 else ""


def what_would_change(result: StudyResult) -> str:
    """The study's last line: for each verdict, the measured margin against its uncertainty
    (:meth:`~rethinkbn_studies.contract.base.Verdict.what_would_change`), computed from its
    effect and interval."""
    parts = [f"{i}. {row.verdict.what_would_change()}"
             for i, row in enumerate(result.summary, start=1)]
    return "**What would change the verdicts** (in the order above): " + "; ".join(parts) + "."


def headline(rows: list[tuple[str, bool]], split: bool = True) -> str:
    """The verdict counts of ``(label, paper_claim)`` pairs, the paper's claims apart from our own
    ablations and mechanism checks: ``"of 30 paper claims, 12 agree, 5 are inconclusive, 3
    disagree, 10 are not testable; of 11 ablations and mechanism checks of ours, ..."``.

    ``split=False`` is for a results.json written before rows said whether they are the paper's
    claims (no ``paper_claim`` key): one count, in that file's wording, ``"23 of 41 claims
    agree, 12 are inconclusive, 6 disagree"`` (and the not-testable count when there are any).
    """
    if not split:
        labels = [label for label, _ in rows]
        untestable = labels.count(NOT_TESTABLE)
        return (f"{labels.count(AGREES)} of {len(labels)} claims agree, "
                f"{labels.count(INCONCLUSIVE)} are inconclusive, {labels.count(DISAGREES)} "
                f"disagree" + (f", {untestable} are not testable" if untestable else ""))
    def counts(labels: list[str], what: str) -> str:
        return (f"of {len(labels)} {what}, {labels.count(AGREES)} agree, "
                f"{labels.count(INCONCLUSIVE)} are inconclusive, {labels.count(DISAGREES)} "
                f"disagree, {labels.count(NOT_TESTABLE)} are not testable")
    paper = [label for label, ours in rows if ours]
    own = [label for label, ours in rows if not ours]
    return counts(paper, "paper claims") + (
        "; " + counts(own, "ablations and mechanism checks of ours") if own else "")


def render_report(outcomes: list[StudyOutcome], env: dict[str, Any], wall_s: float,
                  variation: dict[str, Any] | None = None) -> str:
    """The markdown text of report.md; ``variation``: the folder's variation.json
    (:mod:`~rethinkbn_studies.contract.variation`), shown when it was measured on this run."""
    builds = machine_variation.marks(variation, _verdicts(outcomes))
    counted = [(r.verdict.label, r.paper_claim) for o in outcomes if o.result
               for r in o.result.summary]
    out = [
        "# Rethinking 'Batch' in BatchNorm: a small-scale reproduction",
        "",
        f"{_run_note(env)}Mode: **{env['mode']}**, data: {env['data']}{_fingerprint_note(env)}, "
        f"device: {env['device']} "
        f"({env['torch_threads']} thread{'s' if env['torch_threads'] != 1 else ''}), "
        f"seeds: {env['seeds']}, "
        f"{_ranks_note(env)}wall time: {wall_s:.0f} s"
        f"{_cache_note(env)}. "
        f"Our numbers are error (%), lower is better, of small networks (validation or "
        f"training error; RoI classification error in `leakage`), mean ± std over seeds when "
        f"there are several; the paper's are ResNet-50 on ImageNet (error %) or "
        f"Mask R-CNN/RetinaNet on COCO (AP, higher is better). The verdicts compare the "
        f"*direction* of each effect, with the criterion written beside it; where a verdict "
        f"states an effect, its interval and test, it agrees (disagrees) only when the whole "
        f"interval lies on the paper's (the other) side of the threshold; inconclusive: "
        f"the noise exceeds the margin; not testable: a precondition of the claim, checked by "
        f"a rule fixed in advance, is absent here. At this scale, {headline(counted)}."
        + ("" if builds is None or variation is None else
           " Verdicts of the paper's claims that every other CPU build repeats (see "
           f"*Between-machine variation*): "
           f"{machine_variation.robust_counts(variation['claims'])}."),
        "",
        "## Summary",
        "",
        *_summary_table(outcomes, builds),
        "",
    ]
    for o in outcomes:
        out += [f"## `{o.study.name}`: {o.study.description}", ""]
        if o.result is None:
            out += [f"This study failed after {o.seconds:.0f} s: `{o.error}`", ""]
            continue
        r = o.result
        out += ["**Setup.** " + r.setup, ""]
        for i in range(max(len(r.tables), len(r.paper_tables))):
            if i < len(r.tables):
                out += ["Ours: " + r.tables[i].to_markdown(), ""]
            if i < len(r.paper_tables):
                out += ["Paper: " + r.paper_tables[i].to_markdown(), ""]
        for plot in r.plots:
            out += [f"![{plot}]({plot})", ""]
        out += ["**Verdicts.**", ""]
        out += [f"- {row.claim}: {row.verdict.line()}"
                + (f" **{EXPLAINED}** {row.explanation}" if row.explanation else "")
                for row in r.summary]
        out += [""]
        if r.notes:
            out += [r.notes, ""]
        out += [f"*Wall time of this study: {o.seconds:.0f} s.*", ""]
        out += [what_would_change(r), ""]
    out += _variation_lines(variation, builds)
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    out += ["## Environment", "", f"{versions}; {env['platform']}.", ""]
    return "\n".join(out)


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def section(report: str, study: str) -> str:
    """The text of ``study``'s section of a report.md (from its ``## `study`:`` heading to the
    next heading of that level); raises ``KeyError`` if the report has none."""
    start = report.find(f"\n## `{study}`:")
    if start < 0:
        raise KeyError(f"report.md: no section for study {study!r}")
    end = report.find("\n## ", start + 1)
    return report[start: end if end >= 0 else len(report)]


def untraced_numbers(ours: str, text: str) -> list[str]:
    """The numbers of a summary row's ``ours`` cell that ``text`` (its study's section) does
    not show, so that a reader can trace every number of the summary to a table or a sentence
    of its section. A number (its digits, sign dropped) is shown when ``text`` has it as a whole
    number token, as written or with more decimals that round to it (``79.9`` in ``79.90``;
    ``15.3`` is not in ``15.25``, which rounds to ``15.2``)."""
    shown = {m.group() for m in _NUMBER.finditer(text)}
    rounded: set[str] = set()
    for token in shown:
        decimals = len(token.partition(".")[2])
        rounded.update(f"{float(token):.{d}f}" for d in range(decimals))
    return [m.group() for m in _NUMBER.finditer(ours)
            if m.group() not in shown and m.group() not in rounded]


def write_outputs(out_dir: Path, outcomes: list[StudyOutcome], env: dict[str, Any],
                  wall_s: float) -> Path:
    """Write report.md and results.json into ``out_dir``; returns the report's path. A
    variation.json in ``out_dir`` measured on this run (:func:`.variation.marks`) adds each
    verdict's fate on the other builds (``other_builds``) to results.json's rows and report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    variation = machine_variation.load(out_dir)
    builds = machine_variation.marks(variation, _verdicts(outcomes)) or {}
    results = {
        "environment": {**env, "wall_time_s": wall_s},
        "studies": {
            o.study.name: {
                "description": o.study.description,
                "wall_time_s": o.seconds,
                "error": o.error,
                **(
                    {
                        "numbers": o.result.numbers,
                        "tables": [t.to_json() for t in o.result.tables],
                        "paper_tables": [t.to_json() for t in o.result.paper_tables],
                        "plots": o.result.plots,
                        "summary": [
                            {"claim": r.claim, "ours": r.ours, "paper": r.paper,
                             "paper_claim": r.paper_claim, **r.verdict.to_json(),
                             **({"explanation": r.explanation} if r.explanation else {}),
                             **({"other_builds": builds[(o.study.name, r.claim)]}
                                if builds else {})}
                            for r in o.result.summary
                        ],
                    }
                    if o.result is not None
                    else {}
                ),
            }
            for o in outcomes
        },
    }
    (out_dir / "results.json").write_text(json.dumps(_json_safe(results), indent=2) + "\n")
    report = out_dir / "report.md"
    report.write_text(render_report(outcomes, env, wall_s, variation))
    return report
