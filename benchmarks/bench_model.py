"""Whole training steps: a model with rethinkbn layers against the same model with torch's BN.

    python benchmarks/bench_model.py             # both models, writes benchmarks/results/model.md
    python benchmarks/bench_model.py --quick     # fewer pairs, writes nothing
    python benchmarks/bench_model.py --compile   # the same table with torch.compile (inductor)
    python benchmarks/run.py model               # the same as the first line

Two models, written here in plain torch: the studies' 1-D ResNet on MNIST-1D shapes (batch 128,
1 x 40, channel rows of 40/20/10 values) and a CIFAR-style ResNet-18 (batch 64, 3 x 32 x 32).
A step is forward + cross-entropy + backward + ``SGD.step``. Every variant (:data:`VARIANTS`, one
small entry each) is a model built from the same torch-BN model and compared with a baseline
built from it too (torch's BN in training or eval mode, or a detectron2-style frozen module).

Time: the median [interquartile range] of paired ratios ``time(candidate step) / time(baseline
step)``, the two run back to back in alternating order, each timed with the process's CPU time
on one thread (see ``bench_ghost.paired_ratios``). Memory: the bytes of the distinct storages
that autograd saves for the backward during one step (``saved_tensors_hooks``), candidate over
baseline: the activation memory that sets a step's peak (the parameters are the same). For a
variant above its target the top ops of a profile (``torch.profiler``, self CPU time) are printed
and written beside the table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench_ghost import cell, paired_ratios
from rethinkbn.convert import freeze_bn, to_domain_bn, to_ghost_bn
from rethinkbn.distributed import to_sync_bn
from rethinkbn.distributed.launch import cpu_threads
from rethinkbn.layers import use_domain

RESULTS = Path(__file__).resolve().parent / "results"

# Why the cells above target stay there (measured 2026-12-07 on the 2-core CPU machine, from the
# profiles written below the table and layer-level timings); written after the table.
FLOORS = """## Floors of the cells above target

- **Ghost on the 1-D ResNet (NBS 32, 8, 2).** torch's kernel normalizes over one channel dim,
  which contiguous groups of an ``(N, C, L)`` tensor cannot form without a copy. With rows of
  40/20/10 values, reductions over the strided group view cost more than a copy, so the layer
  copies each group's channel rows into a contiguous buffer: 5 activation-sized copies per
  layer and step (x into rows and the output back in the forward; x and the gradient into rows
  and the input's gradient back in the backward) and 6 passes over the rows in the forward. In
  the profiles below a layer call's forward and backward (``_TransposedGroupNorm`` and its
  backward, CPU total) cost 1.2 ms at NBS 32 and 1.6 ms at NBS 2, against 0.75 ms for torch's
  two kernels in the whole-batch row; ``aten::copy_`` is 12-14% of the step against 2.6%.
  Without the copies (the row kernel on zero-copy views, an earlier version; --quick, 11 pairs)
  the same cells gave 1.38 / 1.55 / 1.46. Reaching torch's cost needs one fused kernel over
  groups (a pass for the statistics, one for the output: C++ or Triton), which this pure-torch
  package does not ship; under ``torch.compile`` inductor generates such code
  (``model_compile.md``).
- **Ghost at NBS = whole batch on the 1-D ResNet.** The layer calls torch's kernel; what is
  left is its Python around the call on a step of a few ms, and the interval reaches the target.
- **DomainBatchNorm with per-sample ids on the 1-D ResNet (shuffled, in two blocks; shuffled on
  ResNet-18 at the target's edge, as the hand-written loop there).** The layer sorts the samples
  by domain, runs torch's kernel once per domain and puts the output back in order; the rows
  "torch BN per domain, hand-written" are that loop written with torch alone, and the layer
  costs about what they cost (the rows "vs torch BN per domain, hand-written"). The floor is the
  loop itself: in the shuffled profile the row permutation (``_PermuteRows``: ``index_select``,
  108 calls over 3 steps) is 9.4% of the step's CPU and the concatenation 2.9%, while torch's
  kernels cost what one call over the whole batch costs (``native_batch_norm``: 54 calls, 9.0
  ms, against 27 calls, 8.8 ms in the whole-batch row): the excess is the regrouping and the
  per-domain bookkeeping, per-call costs on rows of 40/20/10 values. One torch BatchNorm over
  all samples computes something else (one set of statistics), so no layer that keeps per-domain
  statistics can reach it here.
"""
COMPILE_FLOORS = """## Floors of the cells above target

- **Ghost on the 1-D ResNet (NBS 32, 2).** Compiled, the layer is plain torch ops
  (``_composite_group_norm``) that inductor fuses; the cells sit at 1.06-1.07 with intervals
  that reach the target, against 1.25-1.36 eager.
- **DomainBatchNorm with per-sample ids on the 1-D ResNet (shuffled, in two blocks).** Compiled,
  the ids cannot be read on the host without a graph break, so every domain is normalized by one
  vectorized pass of masked reductions whose shapes do not depend on the ids
  (``masked_domain_norm``): no graph break, no recompilation, and on ResNet-18 the same code
  costs 1.00. On the small 1-D model, whose step is mostly BatchNorm on rows of 40/20/10 values,
  inductor's code for those reductions costs more than torch's kernel; the floor written by
  hand, torch BN per domain compiled, costs 1.19 (shuffled, with graph breaks of its own) and
  1.23 (two blocks, slices known in advance) here, and the layer costs 0.63x and 1.06x of it
  (the last two rows).
"""
COMMAND = "python benchmarks/run.py model"


# --------------------------------------------------------------------------------------------
# Models (plain torch, torch's BatchNorm)
# --------------------------------------------------------------------------------------------
class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (projected when the shape changes) shortcut, then ReLU."""

    def __init__(self, dims: int, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.conv1 = conv(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_ch)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = norm(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(conv(in_ch, out_ch, 1, stride=stride, bias=False),
                                          norm(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(dims: int, in_ch: int, widths: tuple[int, ...], blocks: int) -> nn.Module:
    """Stem conv-BN-ReLU, stages of ``blocks`` Blocks (stride 2 from the second), pool, linear."""
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    layers: list[nn.Module] = [conv(in_ch, widths[0], 3, padding=1, bias=False),
                               norm(widths[0]), nn.ReLU()]
    prev = widths[0]
    for i, width in enumerate(widths):
        for j in range(blocks):
            layers.append(Block(dims, prev, width, 2 if i > 0 and j == 0 else 1))
            prev = width
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(*layers, pool, nn.Flatten(), nn.Linear(prev, 10))


@dataclass(frozen=True)
class Model:
    name: str
    key: str  # for --models
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    pairs: int  # paired steps per cell (--quick: a third)


MODELS = [
    # rethinkbn_studies.models.ResNet(1, 1, 10) on MNIST-1D (40 values), batch 128
    Model("1-D ResNet", "resnet1d", lambda: resnet(1, 1, (32, 64, 128), 1), (128, 1, 40), 21),
    # CIFAR-style ResNet-18: 3x3 stem, 4 stages of 2 blocks, batch 64
    Model("ResNet-18", "resnet18", lambda: resnet(2, 3, (64, 128, 256, 512), 2),
          (64, 3, 32, 32), 7),
]


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------
class D2FrozenBatchNorm(nn.Module):
    """detectron2's FrozenBatchNorm2d, in ten lines (any rank): fixed buffers, one multiply-add."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, getattr(bn, name).detach().clone())
        self.eps = bn.eps

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(view) + shift.view(view)


def d2_frozen(model: nn.Module) -> nn.Module:
    """Every torch BN of ``model`` replaced by :class:`D2FrozenBatchNorm` (in place)."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, D2FrozenBatchNorm(child))
        else:
            d2_frozen(child)
    return model


def same(model: nn.Module) -> nn.Module:
    return model


@dataclass(frozen=True)
class Variant:
    """One row: ``candidate(model)`` timed against ``baseline(model)``, both built from a copy of
    the same torch-BN model and stepped in training mode (``train=False``: ``model.eval()``, i.e.
    fine-tuning with fixed BN). ``candidate=None`` is a row still to be filled ("not measured")."""

    name: str
    candidate: Callable[[nn.Module], nn.Module] | None
    baseline: Callable[[nn.Module], nn.Module] = same
    baseline_name: str = "torch BN"
    train: bool = True
    target: float = 1.05
    compiled: bool = True  # a row of the --compile table too


def ghost(nbs: int | None) -> Callable[[nn.Module], nn.Module]:
    # NBS = whole batch: larger than any benchmarked batch
    return lambda model: to_ghost_bn(model, nbs if nbs is not None else 1 << 20)


def torch_sync_bn(model: nn.Module) -> nn.Module:
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def domain_ids(n: int, blocks: bool) -> Tensor:
    """Half of ``n`` samples in each of 2 domains: in two consecutive blocks (a batch
    concatenated from two sources) or shuffled (a fixed scrambled order per batch size: sample
    ``i`` is in domain 1 when ``37 i mod n >= n / 2``: exactly half when 37 does not divide an
    even ``n``). Plain tensor arithmetic, which torch.compile traces: a ``torch.Generator``
    made in the compiled region was a graph break of the benchmark's own."""
    i = torch.arange(n)
    return (i >= n // 2 if blocks else i * 37 % n >= n // 2).long()


class WithDomains(nn.Module):
    """``model`` called inside ``use_domain(model, domain_ids(batch size, blocks))``."""

    def __init__(self, model: nn.Module, blocks: bool) -> None:
        super().__init__()
        self.model, self.blocks = model, blocks

    def forward(self, x: Tensor) -> Tensor:
        with use_domain(self.model, domain_ids(x.size(0), self.blocks)):
            return self.model(x)


class TorchBNPerDomain(nn.Module):
    """The hand-written floor of per-domain BN: one torch BatchNorm per domain on that domain's
    samples (``index_select``, then the outputs concatenated and put back in order; slices and a
    concatenation for blocks), the ids known in advance: no validation, no bookkeeping."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, blocks: bool) -> None:
        super().__init__()
        self.bns = nn.ModuleList([copy.deepcopy(bn), copy.deepcopy(bn)])
        self.blocks = blocks

    def forward(self, x: Tensor) -> Tensor:
        if self.blocks:
            half = x.size(0) // 2
            return torch.cat([self.bns[0](x[:half]), self.bns[1](x[half:])])
        ids = domain_ids(x.size(0), False)
        rows = [(ids == d).nonzero().flatten() for d in (0, 1)]
        y = torch.cat([bn(x.index_select(0, r)) for bn, r in zip(self.bns, rows, strict=True)])
        return y.index_select(0, torch.argsort(torch.cat(rows)))


def replace_bn(model: nn.Module, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, make(child))
        else:
            replace_bn(child, make)
    return model


def two_domains(blocks: bool) -> Callable[[nn.Module], nn.Module]:
    return lambda model: WithDomains(to_domain_bn(model, 2), blocks)


def torch_bn_per_domain(blocks: bool) -> Callable[[nn.Module], nn.Module]:
    return lambda model: replace_bn(model, lambda bn: TorchBNPerDomain(bn, blocks))


VARIANTS = [
    Variant("to_ghost_bn, NBS = whole batch", ghost(None)),
    Variant("to_ghost_bn, NBS 32", ghost(32)),
    Variant("to_ghost_bn, NBS 8", ghost(8), compiled=False),
    Variant("to_ghost_bn, NBS 2", ghost(2)),
    Variant("freeze_bn", freeze_bn, baseline_name="torch BN eval", train=False),
    Variant("freeze_bn", lambda m: freeze_bn(m, affine_trainable=False), d2_frozen,
            "detectron2-style FrozenBatchNorm, train mode", compiled=False),
    Variant("freeze_bn", lambda m: freeze_bn(m, affine_trainable=False), d2_frozen,
            "detectron2-style FrozenBatchNorm, eval mode", train=False, compiled=False),
    Variant("SyncBatchNorm, no process group", to_sync_bn),
    Variant("SyncBatchNorm, no process group", to_sync_bn, torch_sync_bn,
            "torch's SyncBatchNorm, no process group"),
    Variant("DomainBatchNorm, 2 domains, per-sample ids (shuffled)", two_domains(False),
            target=1.10),
    Variant("DomainBatchNorm, 2 domains, per-sample ids (in two blocks)", two_domains(True),
            target=1.10),
    # the floor of the two rows above: what torch costs for BN per domain, written by hand
    Variant("torch BN per domain, hand-written (shuffled)", torch_bn_per_domain(False),
            target=1.10),
    Variant("torch BN per domain, hand-written (in two blocks)", torch_bn_per_domain(True),
            target=1.10),
    Variant("DomainBatchNorm, 2 domains, per-sample ids (shuffled)", two_domains(False),
            torch_bn_per_domain(False), "torch BN per domain, hand-written", target=1.10),
    Variant("DomainBatchNorm, 2 domains, per-sample ids (in two blocks)", two_domains(True),
            torch_bn_per_domain(True), "torch BN per domain, hand-written", target=1.10),
]


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
Step = Callable[[], None]


def sgd_step(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return run


def saved_bytes(step: Step) -> int:
    """Bytes of the distinct storages autograd saves during one step (the activation memory)."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def top_ops(step: Step, rows: int = 8) -> str:
    """The ``rows`` ops with the most self CPU time over 3 steps, as a table."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


@dataclass
class Result:
    ratios: list[float]
    memory: float  # NaN: not measured (compiled)
    profile: str = ""
    breaks: int = 0  # --compile: graph breaks while compiling both models
    compiled_graphs: int = 0  # --compile: graphs compiled for both models (first two steps)
    recompiles: int = 0  # --compile: graphs compiled or broken during the timed steps

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)


def models_for(spec: Model, variant: Variant, compiled: bool) -> tuple[nn.Module, nn.Module]:
    """The candidate and the baseline, from copies of one torch-BN model. Compiled, each cell
    starts from a fresh dynamo state (``torch._dynamo.reset()``) and compiles its own baseline:
    the cells' models share the layers' code objects, and once a frame passes torch's recompile
    limit dynamo runs it eagerly, so a cell measured after many others would time eager code
    (ghost NBS 2 on the 1-D ResNet measured 1.36 after the other cells, 1.01 alone)."""
    torch.manual_seed(0)
    base = spec.build()
    assert variant.candidate is not None
    candidate = variant.candidate(copy.deepcopy(base)).train(variant.train)
    baseline = variant.baseline(copy.deepcopy(base)).train(variant.train)
    if not compiled:
        return candidate, baseline
    torch._dynamo.reset()
    return torch.compile(candidate), torch.compile(baseline)


def dynamo_counts() -> tuple[int, int]:
    """(graph breaks, graphs compiled) so far in this process, from torch._dynamo's counters."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def measure(spec: Model, variant: Variant, pairs: int, compiled: bool) -> Result:
    candidate, baseline = models_for(spec, variant, compiled)
    x = torch.randn(spec.input_shape)
    y = torch.randint(0, 10, (spec.input_shape[0],))
    steps = sgd_step(candidate, x, y), sgd_step(baseline, x, y)
    if not compiled:
        ratios = paired_ratios(*steps, pairs)
        result = Result(ratios, saved_bytes(steps[0]) / saved_bytes(steps[1]))
        if result.median > variant.target or result.memory > variant.target:
            result.profile = top_ops(steps[0])
        return result
    breaks, graphs = dynamo_counts()
    for step in (*steps, *steps):  # compile (twice: a recompilation shows on the second step)
        step()
    warm_breaks, warm_graphs = dynamo_counts()
    ratios = paired_ratios(*steps, pairs)
    after_breaks, after_graphs = dynamo_counts()
    return Result(ratios, float("nan"), breaks=warm_breaks - breaks,
                  compiled_graphs=warm_graphs - graphs,
                  recompiles=after_graphs - warm_graphs + after_breaks - warm_breaks)


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------
def row(variant: Variant, results: list[Result | None]) -> str:
    cells = [f"{variant.name} vs {variant.baseline_name}"]
    for result in results:
        if result is None:
            cells += ["not measured", "-"]
        elif result.memory != result.memory:  # compiled
            cells += [cell(result.ratios), f"{result.compiled_graphs} graphs, {result.breaks} "
                      f"breaks, {result.recompiles} after warm-up"]
        else:
            cells += [cell(result.ratios), f"{result.memory:.2f}"]
    return "| " + " | ".join(cells) + f" | {variant.target:.2f} |"


def table(models: list[Model], pairs: int | None, quick: bool, compiled: bool,
          only: str | None = None) -> tuple[list[str], list[str]]:
    second = "dynamo" if compiled else "memory"
    head = ["| variant | " + " | ".join(f"{m.name} step | {m.name} {second}" for m in models)
            + " | target |", "|---|" + "---|---|" * len(models) + "---|"]
    lines, profiles = list(head), []
    print("\n".join(head), flush=True)
    for variant in VARIANTS:
        if compiled and not variant.compiled:
            continue
        if only is not None and only not in f"{variant.name} vs {variant.baseline_name}":
            continue
        results: list[Result | None] = []
        for spec in models:
            if variant.candidate is None:
                results.append(None)
                continue
            n = pairs or (max(3, spec.pairs // 3) if quick else spec.pairs)
            result = measure(spec, variant, n, compiled)
            results.append(result)
            if result.profile:
                profiles.append(f"### {variant.name} vs {variant.baseline_name}, {spec.name}: "
                                f"{result.median:.2f} step, {result.memory:.2f} memory\n\n"
                                f"```\n{result.profile}```\n")
        lines.append(row(variant, results))
        print(lines[-1], flush=True)
    return lines, profiles


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a third of the pairs, nothing "
                        "written")
    parser.add_argument("--pairs", type=int, default=None, help="paired steps per cell "
                        "(default: per model, 21 for the 1-D ResNet, 7 for ResNet-18)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--models", nargs="*", default=None, help="model keys (default all)",
                        choices=[m.key for m in MODELS])
    parser.add_argument("--only", default=None, help="the rows whose name contains this text "
                        "(nothing written)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    models = [m for m in MODELS if args.models is None or m.key in args.models]
    pairs_text = (f"{args.pairs}" if args.pairs else
                  ", ".join(f"{m.pairs if not args.quick else max(3, m.pairs // 3)} "
                            f"({m.name})" for m in models))
    header = ("time(candidate SGD step) / time(baseline SGD step), fwd + cross-entropy + bwd + "
              "SGD.step, 1 thread, CPU time; step: median [interquartile range] of "
              f"{pairs_text} paired steps in alternating order; memory: bytes autograd saves "
              "for the backward in one step (saved_tensors_hooks, distinct storages), candidate "
              "/ baseline" + ("; torch.compile (inductor, CPU) on both" if args.compile else ""))
    print(header + "\n", flush=True)
    with cpu_threads(1):
        lines, profiles = table(models, args.pairs, args.quick, args.compile, args.only)
    if args.quick or args.only is not None:
        return
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    command = " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])
    out = RESULTS / ("model_compile.md" if args.compile else "model.md")
    out.parent.mkdir(exist_ok=True)
    out.write_text(f"`{command}` on {today}, torch {torch.__version__}, CPU.\n{header}.\n\n"
                   + "\n".join(lines) + "\n"
                   + "\n" + (COMPILE_FLOORS if args.compile else FLOORS)
                   + ("\n## Top ops of the variants above target\n\n" + "\n".join(profiles)
                      if profiles else ""))
    print(f"\nwritten to {out.relative_to(RESULTS.parents[1])}")


if __name__ == "__main__":
    main()
