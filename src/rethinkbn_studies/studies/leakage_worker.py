"""One rank of the ``leakage`` study on real processes; started by torchrun, never imported.

    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        -m rethinkbn_studies.studies.leakage_worker --variant syncbn --seed 0 --scale '{...}' \\
        --out s.pt

Each rank builds the real-rank form of the variant's model (SyncBatchNorm across ranks, the
shuffle across ranks with ``all_to_all``), trains on its share of every step
(:func:`rethinkbn_studies.studies.leakage.train_model`), estimates population statistics with
precise_bn pooled across ranks (per-device variants; SyncBN's are estimated by the parent), and
rank 0 saves ``{"state_dict", "train_loss"}`` to ``--out`` with
:func:`rethinkbn_studies.infra.cache.save_result` (a format that cannot carry code).
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta

import torch
import torch.distributed as dist

from rethinkbn.distributed.launch import end_process_group

from ..infra.cache import save_result
from .leakage import (
    VARIANTS,
    LeakageScale,
    build_model,
    has_batchnorm,
    recompute_roi_population,
    task_images,
    train_model,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--scale", required=True, help="LeakageScale as JSON")
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a collective may wait for the other ranks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    try:
        _run(args)
    except BaseException:
        dist.destroy_process_group()
        raise
    end_process_group()  # every rank done before the group goes (see its docstring)


def _run(args: argparse.Namespace) -> None:
    """Train, estimate and save one variant (rank 0 saves)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    scale = LeakageScale.from_dict(json.loads(args.scale))
    variant = VARIANTS[args.variant]
    train, _, _ = task_images(scale, args.seed)
    model = build_model(variant, scale, args.seed, distributed=True)
    loss = train_model(model, train, scale, args.seed, rank, world)
    # SyncBN's statistics are estimated by the parent on the whole step (train_on_ranks).
    if has_batchnorm(variant) and variant.norm != "sync":
        recompute_roi_population(model, variant, train, scale, args.seed, rank, world)
    # The step's mean loss: every rank's mean over an equal share.
    total = torch.tensor([loss])
    dist.all_reduce(total)
    if rank == 0:
        save_result(args.out, {"state_dict": dict(model.state_dict()),
                               "train_loss": float(total) / world})


if __name__ == "__main__":
    main()
