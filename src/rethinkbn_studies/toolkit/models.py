"""Small ResNets with BatchNorm for the studies: 1-D for MNIST-1D, 2-D for image folders.

Both use torch's own ``BatchNorm1d`` / ``BatchNorm2d`` (momentum 0.1, i.e. the paper's
lambda = 0.9); studies change how BN normalizes with :mod:`rethinkbn.convert` (e.g. to ghost BN
for a normalization batch size) and never by editing the model classes.
"""

from __future__ import annotations

from torch import Tensor, nn

from .data import DataSplit

__all__ = ["BasicBlock", "ResNet", "build_model"]


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (projected when the shape changes) shortcut, then ReLU."""

    def __init__(self, dims: int, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.conv1 = conv(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_ch)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = norm(out_ch)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                conv(in_ch, out_ch, 1, stride=stride, bias=False), norm(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv-BN-ReLU, ``len(widths)`` stages of ``blocks`` BasicBlocks (stride 2 from the
    second stage on), global average pooling and a linear classifier.

    ``features(x)`` returns the pooled features (used by studies that put their own head on top).
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, ...] = (32, 64, 128),
        blocks: int = 1,
    ) -> None:
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"ResNet: dims must be 1 or 2, got {dims}")
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.stem = nn.Sequential(
            conv(in_channels, widths[0], 3, padding=1, bias=False),
            norm(widths[0]),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        in_ch = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BasicBlock(dims, in_ch, width, stride))
                in_ch = width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch

    def features(self, x: Tensor) -> Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def build_model(data: DataSplit, widths: tuple[int, ...] = (32, 64, 128), blocks: int = 1
                ) -> ResNet:
    """The ResNet that fits ``data``: 1-D for sequences, 2-D for images."""
    return ResNet(data.spatial_dims, data.in_channels, data.num_classes, widths, blocks)
