"""Between-machine variation: the same reproduction on other CPU builds, verdict by verdict.

A reproduction runs every training run on one torch thread, so the thread count of the machine
does not enter its numbers; what differs between machines is the vector instruction set that
torch's kernels (ATen) and oneDNN's convolutions choose, which changes the order of the
floating-point reductions, and SGD amplifies those last-bit differences into different models.
``rethinkbn variation`` (:mod:`rethinkbn_studies.infra.variation`) reruns a committed
reproduction with the kernels of other builds (:data:`BUILDS`: environment variables that torch
and oneDNN read at start-up) and writes ``variation.json`` beside its ``results.json``;
:func:`compare` makes that file's claims. A later ``rethinkbn reproduce`` into the same folder
reads it (:func:`load`) and puts each verdict's fate on the other builds into the report
(:func:`marks`, :func:`section`) and results.json: a verdict is **robust** when every build
gives the same verdict; otherwise the summary says which build gave what.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rethinkbn.population import markdown_table

__all__ = ["BUILDS", "Build", "compare", "load", "marks", "robust_counts", "section"]

FILE = "variation.json"


@dataclass(frozen=True)
class Build:
    """Another machine's kernels, emulated on this one: ``env`` for the reproduction's process
    (torch and oneDNN read it when they load)."""

    name: str
    description: str
    env: dict[str, str]


# The instruction sets below AVX-512 that x86 machines commonly have. ATen's own kernels read
# ATEN_CPU_CAPABILITY, oneDNN's (the convolutions) ONEDNN_MAX_CPU_ISA; both at load time.
BUILDS = {
    "avx2": Build("avx2", "AVX2 kernels (a machine without AVX-512)",
                  {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
    "sse": Build("sse", "scalar ATen kernels and SSE4.1 convolutions (an old machine)",
                 {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}),
}


def _rows(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(name, row["claim"]): row for name, study in results["studies"].items()
            for row in study.get("summary", [])}


def _interval(row: dict[str, Any]) -> list[float | None]:
    u = row.get("uncertainty") or {}
    return [u.get("low"), u.get("high")]


def compare(reference: dict[str, Any], builds: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per claim of ``reference`` (a results.json), in its order: the reference's
    verdict, effect and interval, each build's verdict and effect (``builds``: name ->
    results.json of the same command on that build; a claim a build lacks is ``None`` there),
    ``robust`` (every build gave the reference's verdict) and ``effect_spread`` (max - min of
    the effects, reference included; None where an effect is missing)."""
    others = {name: _rows(results) for name, results in builds.items()}
    claims = []
    for (study, claim), row in _rows(reference).items():
        got = {name: rows.get((study, claim)) for name, rows in others.items()}
        effects = [row.get("effect")] + [r.get("effect") if r else None for r in got.values()]
        known = [float(e) for e in effects if e is not None]
        spread = max(known) - min(known) if len(known) == len(effects) else None
        claims.append({
            "study": study, "claim": claim, "paper_claim": row.get("paper_claim", True),
            "verdict": row["verdict"], "effect": row.get("effect"),
            "interval": _interval(row),
            "builds": {name: (None if r is None else
                              {"verdict": r["verdict"], "effect": r.get("effect"),
                               "interval": _interval(r)})
                       for name, r in got.items()},
            "robust": all(r is not None and r["verdict"] == row["verdict"]
                          for r in got.values()),
            "effect_spread": spread,
        })
    return claims


def load(out_dir: Path) -> dict[str, Any] | None:
    """``out_dir``'s variation.json (plain JSON, no code runs), or None when there is none;
    a file that is not valid JSON is a ``ValueError`` naming it."""
    path = Path(out_dir) / FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid variation file ({err}); delete it or rerun "
                         "`rethinkbn variation`") from None
    if not isinstance(data, dict) or not isinstance(data.get("claims"), list):
        raise ValueError(f"{path}: not a valid variation file (no list of claims)")
    return data


def marks(variation: dict[str, Any] | None,
          verdicts: dict[tuple[str, str], str]) -> dict[tuple[str, str], str] | None:
    """Per ``(study, claim)`` of ``verdicts`` (this run's verdict labels), what the other builds
    gave: ``"same"`` or e.g. ``"avx2: inconclusive"``. None when there is no variation, or when
    it was measured on another run (a claim or a verdict of this run differs from the
    variation's reference, so its builds say nothing about these verdicts)."""
    if variation is None:
        return None
    claims = {(c["study"], c["claim"]): c for c in variation["claims"]}
    if set(claims) != set(verdicts) or any(claims[k]["verdict"] != v
                                           for k, v in verdicts.items()):
        return None
    out = {}
    for key, c in claims.items():
        differ = [f"{name}: {'missing' if b is None else b['verdict']}"
                  for name, b in c["builds"].items()
                  if b is None or b["verdict"] != c["verdict"]]
        out[key] = "same" if not differ else "; ".join(differ)
    return out


def robust_counts(claims: list[dict[str, Any]]) -> str:
    """``"19 of the 23 paper claims that agree, and 9 of 11 inconclusive, agree or stay
    inconclusive on every other build"``-style counts: per verdict of the paper's claims, how
    many every build repeats."""
    parts = []
    for label in ("agrees", "disagrees", "inconclusive", "not testable"):
        group = [c for c in claims if c["paper_claim"] and c["verdict"] == label]
        if group:
            parts.append(f"{sum(c['robust'] for c in group)} of {len(group)} {label}")
    return ", ".join(parts)


def _effect(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def section(variation: dict[str, Any]) -> list[str]:
    """The report's section on ``variation``: which builds ran, how many verdicts each build
    repeats, and a table of every claim whose verdict changed on some build (with the effects),
    then the largest effect spreads of the robust ones."""
    builds = variation["builds"]
    claims = variation["claims"]
    names = list(builds)
    lines = ["## Between-machine variation", "",
             f"The same command was rerun with the kernels of {len(names)} other CPU builds "
             f"on {variation['date']} (`{variation['command']}`; the runs use one torch thread "
             "each, so the machine's thread count does not enter them): "
             + "; ".join(f"**{n}**: {builds[n]['description']} (`" + " ".join(
                 f"{k}={v}" for k, v in builds[n]["env"].items()) + f"`, "
                 f"{builds[n]['wall_time_s']:.0f} s)" for n in names)
             + ". Different vector kernels reduce in a different order; SGD amplifies the "
             "last-bit differences, so each build trains different models from the same seeds. "
             f"Paper claims whose verdict every build repeats, per verdict: "
             f"{robust_counts(claims)}. A verdict that changes on some build is marked in the "
             "summary's last column; read it as no stronger than the weakest verdict it got.",
             ""]
    changed = [c for c in claims if not c["robust"]]
    if changed:
        header = ["study", "claim", "verdict here", *names, "effect here",
                  *(f"effect {n}" for n in names)]
        rows = [[f"`{c['study']}`", c["claim"], c["verdict"],
                 *("missing" if c["builds"][n] is None else c["builds"][n]["verdict"]
                   for n in names),
                 _effect(c["effect"]),
                 *(_effect(None if c["builds"][n] is None else c["builds"][n]["effect"])
                   for n in names)] for c in changed]
        lines += ["Claims whose verdict changes on another build (effects in points):", "",
                  markdown_table("", header, rows, right_aligned=False), ""]
    else:
        lines += ["Every build gave every verdict of this run.", ""]
    spreads = sorted((c for c in claims if c["robust"] and c["effect_spread"] is not None),
                     key=lambda c: -c["effect_spread"])[:5]
    if spreads:
        moved = "; ".join(f"`{c['study']}` {c['claim']}: {c['effect_spread']:.2f}"
                          for c in spreads)
        lines += ["The robust verdicts whose effect moved most between builds (in the units "
                  f"of its criterion): {moved}.", ""]
    return lines
