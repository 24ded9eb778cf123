"""Built-in demo models: random weights (seeded), no downloads.

Each factory returns a module in eval mode whose ``example_input()`` gives ONE item (no batch
dimension), which the profiler stacks into batches. ``demo_config_path()`` is a serve config
listing all four.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CNN",
    "MLP",
    "DemoModel",
    "Noop",
    "Transformer",
    "cnn",
    "demo_config_path",
    "mlp",
    "noop",
    "transformer",
]


def demo_config_path() -> Path:
    """The packaged serve config (TOML) that lists ``noop``, ``mlp``, ``cnn``, ``transformer``."""
    return Path(__file__).with_name("demo.toml")


class DemoModel(nn.Module):
    """A module that can make one example input item for profiling."""

    def example_input(self) -> torch.Tensor:
        raise NotImplementedError


class Noop(DemoModel):
    """Identity: returns its input unchanged, whatever its type."""

    def forward(self, x: Any) -> Any:
        return x

    def example_input(self) -> torch.Tensor:
        return torch.zeros(8, dtype=torch.float32)


class MLP(DemoModel):
    """Linear-ReLU-Linear-ReLU-Linear, ``(d_in,)`` -> ``(d_out,)`` per item."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.d_in = d_in
        self.net = nn.Sequential(
            nn.Linear(d_in, d_hidden),
            nn.ReLU(),
            nn.Linear(d_hidden, d_hidden),
            nn.ReLU(),
            nn.Linear(d_hidden, d_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def example_input(self) -> torch.Tensor:
        return torch.randn(self.d_in, generator=torch.Generator().manual_seed(1))


class CNN(DemoModel):
    """Three conv-ReLU-maxpool stages, then a linear classifier: ``(C, S, S)`` -> ``(classes,)``."""

    def __init__(self, channels: int, size: int, classes: int) -> None:
        super().__init__()
        self.channels = channels
        self.size = size
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(4),
        )
        self.head = nn.Linear(64 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.features(x)
        out: torch.Tensor = self.head(features.flatten(1))
        return out

    def example_input(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        return torch.randn(self.channels, self.size, self.size, generator=generator)


class Transformer(DemoModel):
    """A small ``nn.TransformerEncoder`` (batch first): ``(seq, d_model)`` -> same shape."""

    def __init__(self, d_model: int, nhead: int, layers: int, seq: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.seq = seq
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.encoder(x)
        return out

    def example_input(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        return torch.randn(self.seq, self.d_model, generator=generator)


def noop() -> Noop:
    """The echo model."""
    return Noop().eval()


def mlp(d_in: int = 512, d_hidden: int = 2048, d_out: int = 512) -> MLP:
    """An MLP ``d_in``-``d_hidden``-``d_hidden``-``d_out`` with seeded random weights."""
    torch.manual_seed(0)
    return MLP(d_in, d_hidden, d_out).eval()


def cnn(channels: int = 3, size: int = 64, classes: int = 10) -> CNN:
    """A small image classifier for ``(channels, size, size)`` float32 items."""
    torch.manual_seed(0)
    return CNN(channels, size, classes).eval()


def transformer(d_model: int = 256, nhead: int = 4, layers: int = 2, seq: int = 32) -> Transformer:
    """A small transformer encoder for ``(seq, d_model)`` float32 items."""
    torch.manual_seed(0)
    return Transformer(d_model, nhead, layers, seq).eval()
