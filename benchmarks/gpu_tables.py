"""GPU tables: Ghost BN and precise_bn against their torch baselines, with memory bandwidth.

    python benchmarks/gpu_tables.py --out report.md     # appends its tables to report.md

Run by ``benchmarks/gpu.sh`` (which also runs the CUDA tests and ``bench_sync.py --device
cuda``). Without CUDA it prints one line and exits 0: it never makes up a GPU number.

* Ghost BN: forward+backward of :class:`~rethinkbn.layers.GhostBatchNorm` (contiguous groups)
  over torch's BatchNorm (cuDNN) on the same tensor, per shape, dtype and normalization batch
  size, timed with CUDA events after warm-up. BatchNorm is bandwidth-bound: a fwd+bwd reads and
  writes about 5 tensors of the input's size (read x; write y; read dy, x; write dx), so the
  achieved bandwidth is ``5 * bytes(x) / time``, printed beside the GPU's peak.
* precise_bn: one pass of :func:`~rethinkbn.precise_bn` over ``B`` batches of a small ResNet-like
  network, over ``B`` bare forwards in eval mode under ``no_grad``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rethinkbn import GhostBatchNorm, precise_bn

SHAPES = [(256, 64, 16, 16), (128, 256, 8, 8), (1024, 64, 40), (256, 256, 56, 56)]
NBS = [2, 4, 32, None]
DTYPES = ["float32", "float16"]
TORCH_BN = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d}
TENSOR_PASSES = 5
# Peak HBM bandwidth in TB/s by product name (vendor data sheets); unknown GPUs print "?".
PEAK_TBPS = {"H200": 4.8, "H100 SXM": 3.35, "H100 PCIe": 2.0, "H100": 3.35, "A100-SXM4-80GB": 2.0,
             "A100": 1.55, "L40S": 0.864, "A10": 0.6, "V100": 0.9, "T4": 0.32}
WARMUP, REPEATS = 5, 15


def peak_tbps(name: str) -> float | None:
    for key, value in PEAK_TBPS.items():  # the first, most specific, key that matches
        if key in name:
            return value
    return None


def cuda_time(fn: Callable[[], None], repeats: int = REPEATS) -> float:
    """Median seconds of ``fn()`` over ``repeats`` CUDA-event-timed calls, after warm-up."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1000)
    return statistics.median(times)


def fwd_bwd(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        layer(x).backward(dy)

    return run


def ghost_table(peak: float | None) -> list[str]:
    lines = [
        f"### Ghost BN fwd+bwd / torch BatchNorm (cuDNN), training mode, CUDA events, median of "
        f"{REPEATS} after {WARMUP} warm-up calls; bandwidth = {TENSOR_PASSES} x bytes(x) / time "
        f"(peak {'?' if peak is None else f'{peak:.2f} TB/s'})",
        "",
        "| shape | dtype | NBS | ghost / torch | ghost ms | ghost TB/s | torch TB/s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for shape in SHAPES:
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
            dy = torch.randn_like(x)
            traffic = TENSOR_PASSES * x.numel() * x.element_size()
            channels = shape[1]
            torch_s = cuda_time(fwd_bwd(TORCH_BN[len(shape)](channels).cuda(), x, dy))
            for nbs in NBS:
                ghost = GhostBatchNorm(channels, nbs).cuda()
                ghost_s = cuda_time(fwd_bwd(ghost, x, dy))
                label = "full" if nbs is None else str(nbs)
                lines.append(
                    f"| {shape} | {dtype_name} | {label} | {ghost_s / torch_s:.2f} | "
                    f"{ghost_s * 1e3:.3f} | {traffic / ghost_s / 1e12:.2f} | "
                    f"{traffic / torch_s / 1e12:.2f} |"
                )
                print(lines[-1], flush=True)
            del x, dy
            torch.cuda.empty_cache()
    return lines


def resnet_like() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 64), *block(64, 64), nn.MaxPool2d(2), *block(64, 128),
                         *block(128, 128), nn.MaxPool2d(2), *block(128, 256), *block(256, 256))


def precise_row(dtype_name: str, batches: int = 8, shape: tuple[int, ...] = (64, 3, 64, 64)
                ) -> str:
    model = resnet_like().cuda()
    data = [torch.randn(shape, device="cuda") for _ in range(batches)]
    half = dtype_name == "float16"

    def bare() -> None:
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", enabled=half):
            for batch in data:
                model(batch)

    def precise() -> None:
        with torch.autocast("cuda", enabled=half):
            precise_bn(model, data, num_samples=None, num_batches=batches, progress=False)

    bare_s, precise_s = cuda_time(bare, 5), cuda_time(precise, 5)
    return (f"| {batches} | {shape} | {dtype_name}{' (autocast)' if half else ''} | "
            f"{precise_s / bare_s:.2f} | {precise_s * 1e3:.1f} |")


def precise_table() -> list[str]:
    lines = ["### precise_bn pass / bare eval forwards (no_grad), same batches, CUDA events", "",
             "| batches | batch shape | dtype | precise_bn / forward | precise_bn ms |",
             "|---:|---|---|---:|---:|"]
    for dtype_name in DTYPES:
        lines.append(precise_row(dtype_name))
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown file to append to")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("gpu_tables: no CUDA device; skipped (no GPU number is made up)")
        return 0
    name = torch.cuda.get_device_name()
    peak = peak_tbps(name)
    header = [f"## GPU tables: {name}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC,"
              f" torch {torch.__version__}", ""]
    lines = header + ghost_table(peak) + [""] + precise_table() + [""]
    with args.out.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"gpu_tables: appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
