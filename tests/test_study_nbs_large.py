"""Sec. 4 (nbs), the large arm of full mode (issue 20, item 5): which runs it asks for (and that
quick mode asks for the same runs as before it), its verdicts' preconditions, its section."""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from rethinkbn_studies.contract.base import RunContext
from rethinkbn_studies.infra.cache import RunCache, config_key
from rethinkbn_studies.infra.tasks import no_progress
from rethinkbn_studies.studies import nbs, nbs_large
from rethinkbn_studies.toolkit.common import Scale
from test_study_nbs import fig5_case


@dataclass(frozen=True)
class KeyRecorder(RunContext):
    """A context that trains nothing: it records the cache key of every task a study asks for
    and hands back stand-in results (an empty evaluation, a 0/1 vector of one sample)."""

    keys: list[str] = field(default_factory=list)

    def run_all(self, tasks, desc="runs"):
        self.keys.extend(config_key(t.config) for t in tasks)
        return [{} if t.config.get("run") == "eval" else np.zeros(1) for t in tasks]


def recorder(quick, data_spec="mnist1d", seeds=(0, 1, 2)):
    return KeyRecorder(quick=quick, seeds=seeds, out_dir=Path("unused"),
                       device=torch.device("cpu"), cache=RunCache(None), progress=no_progress,
                       dataset=lambda: None, data_spec=data_spec)


def digest(keys):
    return len(set(keys)), hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()[:16]


# The study's scales on MNIST-1D (common.ghost_scale): 1000 training / 2000 validation samples,
# 40 epochs in quick mode and 80 in full mode.
QUICK_SCALE = Scale(1000, 2000, 40, (16, 32, 64))
FULL_SCALE = Scale(1000, 2000, 80, (16, 32, 64))


@pytest.mark.parametrize(("quick", "scale", "expected"), [
    # recorded at commit 0742290, before the large arm existed (3 seeds)
    (True, QUICK_SCALE, (42, "127e7849978dd97b")),
    (False, FULL_SCALE, (54, "4d27ca1c0cc39b11")),
])
def test_the_sweeps_runs_keep_their_cache_keys(quick, scale, expected):
    """Quick mode asks for exactly the runs it asked for before the arm (its numbers cannot
    change), and full mode's sweep keeps its keys (a warm cache stays warm)."""
    ctx = recorder(quick)
    nbs.measure(ctx, scale)
    assert digest(ctx.keys) == expected
    if quick:  # the arm asks for nothing in quick mode
        assert nbs.measure_large(ctx, scale) is None and digest(ctx.keys) == expected


def test_the_arm_runs_in_full_mode_on_mnist1d_only():
    assert not nbs_large.runs_in(recorder(True))
    assert nbs_large.runs_in(recorder(False)) and nbs_large.runs_in(recorder(False, "mnist1d:400"))
    assert not nbs_large.runs_in(recorder(False, "/data/cifar10"))


def test_the_arms_training_runs_are_the_shared_models_on_its_own_data():
    ctx = recorder(False, seeds=(0, 1))
    arm = nbs_large.large_context(ctx)
    scale = nbs_large.large_scale(ctx, FULL_SCALE)
    assert scale == Scale(16384, 2000, nbs_large.LARGE_EPOCHS, (16, 32, 64))
    jobs = nbs_large.training_tasks(arm, scale)
    assert [(n, s) for n, s, _ in jobs] == [(n, s) for n in (2, 32, 128) for s in (0, 1)]
    for n, s, task in jobs:
        c = task.config
        assert c["model"] == "ghost-resnet" and c["blocks"] == 3 and (c["nbs"], c["seed"]) == (n, s)
        # a generation of its own: 20480 samples, 80% of them (16384) for training
        assert c["data"] == "mnist1d:20480:corr0.6" and c["scale"]["num_train"] == 16384
    sweep = recorder(False, seeds=(0, 1))
    nbs.measure(sweep, FULL_SCALE)
    assert not {config_key(t.config) for *_, t in jobs} & set(sweep.keys)


def test_the_arm_with_tiny_is_the_study_scale_with_three_blocks():
    ctx = dataclasses.replace(recorder(False), tiny=True)
    tiny = Scale(300, 200, 2, (4, 8))
    assert nbs_large.large_context(ctx) is ctx and nbs_large.large_scale(ctx, tiny) is tiny


ARM = f"{nbs_large.NAME}: "


def test_the_arm_judges_the_sweeps_claims_under_its_name(labels):
    rows = nbs.sweep_verdicts(*fig5_case(), ARM)
    assert labels(rows) == ["agrees"] * 4
    assert [r.claim for r in rows] == [ARM + r.claim for r in nbs.verdicts(*fig5_case())[:4]]


@pytest.mark.parametrize(("change", "row", "says"), [
    ([("train_pop", "2", 10.0 + nbs.POP_FIT_MARGIN)], 0, "under-fit"),
    ([("train_mub", "2", nbs.REGULARIZATION_FLOOR / 2)], 3, "floor"),
])
def test_the_arms_claims_are_not_testable_where_their_precondition_fails(change, row, says):
    met = nbs.sweep_verdicts(*fig5_case(), ARM)[row].verdict
    failed = nbs.sweep_verdicts(*fig5_case(change), ARM)[row].verdict
    assert met.label == "agrees" and not met.precondition
    assert failed.label == "not testable" and says in failed.precondition


def test_the_setup_says_when_fewer_seeds_ran_than_the_design_asks():
    scale = Scale(16384, 2000, nbs_large.LARGE_EPOCHS, (16, 32, 64))
    one = nbs_large.setup_sentence(recorder(False, seeds=(0,)), scale, 21)
    two = nbs_large.setup_sentence(recorder(False, seeds=(0, 1)), scale, 21)
    assert "Only 1 seed ran" in one and "at least 2" in one
    assert "Only" not in two and "21 BN layers" in two and "16384 training" in two


@pytest.fixture(scope="module")
def tiny_full_run(tmp_path_factory, data_file):
    """``reproduce --tiny --only nbs`` (full mode, so the arm runs), once for this module."""
    import shutil

    from rethinkbn.cli import main

    out = tmp_path_factory.mktemp("nbs-large")
    (out / "cache").mkdir()
    shutil.copy(data_file, out / "cache")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["reproduce", "--tiny", "--data", "mnist1d:1000", "--only", "nbs",
                     "--out", str(out), "--jobs", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    results = json.loads((out / "results.json").read_text())["studies"]["nbs"]
    return (out / "report.md").read_text(), results


def test_the_arm_has_its_tables_rows_and_sentences_in_the_section(tiny_full_run):
    report, results = tiny_full_run
    assert f"**Large arm** ({nbs_large.NAME})" in report
    assert f"**Mechanism, {nbs_large.NAME}**" in report
    titles = [t["title"] for t in results["tables"]]
    assert f"{nbs_large.NAME}: error (%) against NBS (- : not measured)" in titles
    assert any(t.startswith(f"{nbs_large.NAME}: between-sample share") for t in titles)
    arm_rows = [r for r in results["summary"] if r["claim"].startswith(ARM)]
    assert len(arm_rows) == 4


def test_the_arms_numbers_hold_every_measured_quantity_per_nbs(tiny_full_run):
    numbers = tiny_full_run[1]["numbers"]["large_arm"]
    assert numbers["blocks"] == 3 and numbers["seeds"] == [0]
    for curve in ("val_pop", "val_mub", "val_mub_large", "train_pop", "train_mub"):
        assert set(numbers["mean"][curve]) == {"2", "32", "128"}
    shares = numbers["between_sample_share"]["2"]
    stages = 2  # --tiny's widths (4, 8): the stem, 2 per block, a projection from stage 2 on
    assert len(shares) == 1 + 2 * 3 * stages + (stages - 1)
    assert all(0.0 <= v <= 1.0 for v in shares.values())
