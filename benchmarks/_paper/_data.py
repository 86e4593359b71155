"""Offline data sets of the paper benchmarks: everything is bundled with an installed package or built locally.

Single-task (instance-wise risk minimisation, Quinton & Rey, arXiv:2406.16232, Section 5: a training
subset of 1024 examples):

* ``digits`` — scikit-learn's bundled 8×8 handwritten digits (1797 images, UCI "optdigits" test set);
* ``mnist1d`` — MNIST-1D (Greydanus, "Scaling down deep learning", arXiv:2011.14439), generated locally
  by the ``mnist1d`` package's ``make_dataset`` with its default arguments (5000 sequences of length 40,
  4000 train / 1000 test); nothing is downloaded;
* ``breast_cancer`` — scikit-learn's bundled Wisconsin diagnostic breast cancer (569 × 30 features):
  only 455 training examples (80 %), fewer than the protocol's 1024.

Multi-task:

* ``multidigits`` — MultiDigits, built from the digits the way MultiMNIST is built from MNIST (Sabour,
  Frosst & Hinton, NeurIPS 2017; the multi-task version of Sener & Koltun, NeurIPS 2018): two digits on a
  12×12 canvas, the left one shifted by 0–1 pixel from the top-left corner, the right one by 3–4 pixels,
  overlaid with a pixel-wise maximum; the tasks are the left and the right digit. Pairs are drawn within
  the train split and within the test split of the single images, so no test image is seen in training;
* ``cancer_mtl`` — Caruana's "related tasks from held-out features" (Caruana, Machine Learning 28, 1997)
  on the breast-cancer data: the inputs are the ten "mean" features; the tasks are the diagnosis
  (classification) and two of the "worst" features (``worst texture``, ``worst concave points``,
  regression on standardised values).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

TRAIN_SUBSET = 1024  # the paper's training-subset size


class TensorDictDataset(Dataset):
    """A map-style dataset over aligned tensors: item ``i`` is ``{name: tensor[i]}`` (what the Trainer collates)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        sizes = {len(value) for value in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"all tensors must have the same length, got {sizes}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: value[index] for name, value in self.tensors.items()}


@dataclass
class Task:
    """One task of a data set: its label column, output size (classes, or 1 for regression) and metric."""

    name: str
    num_outputs: int

    @property
    def is_classification(self) -> bool:
        return self.num_outputs > 1

    @property
    def metric(self) -> str:
        """``accuracy`` (higher is better) for classification, ``mse`` (lower is better) for regression."""
        return "accuracy" if self.is_classification else "mse"


@dataclass
class Split:
    """Train and test data of one data set, with its tasks (one task for single-task sets)."""

    name: str
    train: TensorDictDataset
    test: TensorDictDataset
    tasks: list[Task] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()


def _tensors(x: np.ndarray, labels: dict[str, np.ndarray]) -> TensorDictDataset:
    out = {"x": torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)}
    for name, value in labels.items():
        dtype = torch.long if np.issubdtype(value.dtype, np.integer) else torch.float32
        out[name] = torch.as_tensor(value, dtype=dtype)
    return TensorDictDataset(out)


def _digit_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def load_digits_split(train_size: int = TRAIN_SUBSET, seed: int = 0) -> Split:
    """Digits ``[N, 1, 8, 8]`` in [0, 1]: ``train_size`` random images for training, the other 773 for test."""
    images, labels = _digit_images()
    order = np.random.default_rng(seed).permutation(len(images))
    train, test = order[:train_size], order[train_size:]
    return Split(
        "digits",
        _tensors(images[train, None], {"labels": labels[train]}),
        _tensors(images[test, None], {"labels": labels[test]}),
        [Task("labels", 10)],
        (1, 8, 8),
    )


def load_mnist1d_split(train_size: int = TRAIN_SUBSET, num_samples: int = 5000) -> Split:
    """MNIST-1D from ``mnist1d.data.make_dataset`` (default arguments, seed 42), as ``[N, 1, 1, 40]`` images.

    The first ``train_size`` of its 4000 training sequences form the training subset; its 1000 test
    sequences the test set (with ``num_samples`` = 5000, the default). Shaped as one-row images so that the
    CNN's ``Conv2d`` layers with ``(1, k)`` kernels act as 1-D convolutions.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    data = make_dataset(args)
    x_train, y_train = data["x"][:train_size], data["y"][:train_size]
    return Split(
        "mnist1d",
        _tensors(x_train[:, None, None, :], {"labels": y_train.astype(np.int64)}),
        _tensors(data["x_test"][:, None, None, :], {"labels": data["y_test"].astype(np.int64)}),
        [Task("labels", 10)],
        (1, 1, x_train.shape[-1]),
    )


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0) + 1e-8
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def _cancer_order(seed: int) -> tuple[np.ndarray, np.ndarray, object]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    order = np.random.default_rng(seed).permutation(len(data.target))
    cut = int(0.8 * len(order))
    return order[:cut], order[cut:], data


def load_breast_cancer_split(train_size: int = TRAIN_SUBSET, seed: int = 0) -> Split:
    """Breast cancer, 30 standardised features, 2 classes; 80 % / 20 %: at most 455 train (< 1024), 114 test."""
    train, test, data = _cancer_order(seed)
    train = train[:train_size]
    x_train, x_test = _standardise(data.data[train], data.data[test])
    target = data.target.astype(np.int64)
    return Split(
        "breast_cancer",
        _tensors(x_train, {"labels": target[train]}),
        _tensors(x_test, {"labels": target[test]}),
        [Task("labels", 2)],
        (x_train.shape[1],),
    )


IWRM_DATASETS = {
    "digits": load_digits_split,
    "mnist1d": load_mnist1d_split,
    "breast_cancer": load_breast_cancer_split,
}


def overlay_pairs(
    images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator, canvas: int = 12
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MultiMNIST-style pairs: ``count`` canvases ``[count, canvas, canvas]`` with a left and a right digit.

    For each pair, two images are drawn at random (independently, so the two labels may coincide); the
    left one is placed at an offset of 0–1 pixel from the top-left corner, the right one at 3–4 pixels
    (rows and columns drawn independently), and the canvas is their pixel-wise maximum.
    """
    size = images.shape[-1]
    if canvas < size + 4:
        raise ValueError(f"canvas must be at least the image size + 4 = {size + 4}, got {canvas}")
    left, right = rng.integers(0, len(images), count), rng.integers(0, len(images), count)
    out = np.zeros((count, canvas, canvas), dtype=np.float32)
    for i in range(count):
        r1, c1 = rng.integers(0, 2, 2)
        r2, c2 = rng.integers(3, 5, 2)
        out[i, r1 : r1 + size, c1 : c1 + size] = images[left[i]]
        window = out[i, r2 : r2 + size, c2 : c2 + size]
        np.maximum(window, images[right[i]], out=window)
    return out, labels[left], labels[right]


def load_multidigits_split(train_pairs: int = 2048, test_pairs: int = 1000, seed: int = 0) -> Split:
    """MultiDigits (see the module docstring): ``[N, 1, 12, 12]`` canvases, tasks ``left`` and ``right``."""
    images, labels = _digit_images()
    order = np.random.default_rng(seed).permutation(len(images))
    train, test = order[:TRAIN_SUBSET], order[TRAIN_SUBSET:]
    rng = np.random.default_rng(seed + 1)
    x_train, l_train, r_train = overlay_pairs(images[train], labels[train], train_pairs, rng)
    x_test, l_test, r_test = overlay_pairs(images[test], labels[test], test_pairs, rng)
    return Split(
        "multidigits",
        _tensors(x_train[:, None], {"left": l_train, "right": r_train}),
        _tensors(x_test[:, None], {"left": l_test, "right": r_test}),
        [Task("left", 10), Task("right", 10)],
        (1, 12, 12),
    )


CANCER_TARGETS = ("worst texture", "worst concave points")


def load_cancer_mtl_split(seed: int = 0) -> Split:
    """Breast cancer as three tasks (see the module docstring): ``diagnosis`` + two standardised "worst" features."""
    train, test, data = _cancer_order(seed)
    names = list(data.feature_names)
    inputs = [i for i, name in enumerate(names) if name.startswith("mean ")]
    x_train, x_test = _standardise(data.data[train][:, inputs], data.data[test][:, inputs])
    labels_train: dict[str, np.ndarray] = {"diagnosis": data.target[train].astype(np.int64)}
    labels_test: dict[str, np.ndarray] = {"diagnosis": data.target[test].astype(np.int64)}
    for target in CANCER_TARGETS:
        column = names.index(target)
        y_train, y_test = _standardise(data.data[train][:, column], data.data[test][:, column])
        key = target.replace(" ", "_")
        labels_train[key], labels_test[key] = y_train, y_test
    tasks = [Task("diagnosis", 2)] + [Task(target.replace(" ", "_"), 1) for target in CANCER_TARGETS]
    return Split(
        "cancer_mtl",
        _tensors(x_train, labels_train),
        _tensors(x_test, labels_test),
        tasks,
        (x_train.shape[1],),
    )


MTL_DATASETS = {"multidigits": load_multidigits_split, "cancer_mtl": load_cancer_mtl_split}
