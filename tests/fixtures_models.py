"""Tiny PyTorch factories the CLI tests name as ``fixtures_models:FACTORY`` (tests/ is on sys.path).

Weights are seeded so that every call returns the same model: ``edgekit verify`` re-creates the source model from
the bundle's lineage and must get the one that was built.
"""

from __future__ import annotations

INPUT_SHAPE = (1, 3, 16, 16)
NUM_CLASSES = 10


def tiny_cnn():
    """A small classifier: input (N, 3, 16, 16) -> logits (N, 10); 3 weighted layers."""
    import torch
    import torch.nn as nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, NUM_CLASSES),
        )
    return net.eval()


def broken_factory():
    """A factory that fails when called."""
    raise RuntimeError("this factory is broken on purpose")


def tiny_cnn_other():
    """``tiny_cnn``'s architecture with different weights: a wrong original to verify a bundle against."""
    import torch

    net = tiny_cnn()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    return net


def tiny_conv1d():
    """A 1-D conv classifier (audio-like): input (N, 4, 32) -> logits (N, 5)."""
    import torch

    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv1d(8, 8, 3),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(),
                               torch.nn.Linear(8, 5)).eval()


def tiny_bn_cnn(seed: int = 0):
    """``tiny_cnn`` with BatchNorm after each conv (non-trivial statistics): the agent's adaptation fixture."""
    import torch
    import torch.nn as nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, NUM_CLASSES),
        )
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
    return net.eval()


def tiny_bn_cnn_other():
    """``tiny_bn_cnn`` with other weights: a model that disagrees with it (fails an update's probation)."""
    return tiny_bn_cnn(seed=7)
