"""Data loaders: the bundled MNIST subset, IDX and CIFAR-10 files written here, and every error."""

import gzip
import io
import pickle
import struct
from importlib import resources

import numpy as np
import pytest
import torch

from fastsparse.workflow.datasets import (
    DATASET_NAMES,
    Dataset,
    load_cifar10,
    load_dataset,
    load_mnist,
    load_mnist_subset,
)

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")


# --------------------------------------------------------------------------- file writers


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0, 0, type 0x08, ndim, big-endian sizes, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_file(path, payload: bytes, gz: bool):
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_mnist(directory, n_train=5, n_test=3, gz=False, seed=0):
    """Write tiny MNIST IDX files; return the arrays written. gz may be a bool or 'mixed'."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for i, (name, array) in enumerate(arrays.items()):
        use_gz = bool(i % 2) if gz == "mixed" else gz
        write_file(directory / name, idx_bytes(array), use_gz)
    return arrays


def python2_pickle(data: np.ndarray, labels, batch_label: bytes) -> bytes:
    """A CIFAR-10 batch exactly as the official files store it: a Python 2 pickle (protocol 2)
    with byte-string keys and numpy.core.multiarray._reconstruct globals, written opcode by opcode
    because Python 3 cannot produce it. data: uint8 (n, 3072)."""
    P = pickle

    def string(b: bytes) -> bytes:  # a Python 2 str
        if len(b) < 256:
            return P.SHORT_BINSTRING + bytes([len(b)]) + b
        return P.BINSTRING + struct.pack("<i", len(b)) + b

    def integer(i: int) -> bytes:
        return P.BININT + struct.pack("<i", i)

    # fmt: off
    # numpy.dtype("u1", 0, 1) with state (3, "|", None, None, None, -1, -1, 0)
    dtype = (
        P.GLOBAL + b"numpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + P.TUPLE3
        + P.REDUCE + P.MARK + integer(3) + string(b"|") + P.NONE * 3
        + integer(-1) + integer(-1) + integer(0) + P.TUPLE + P.BUILD
    )
    # _reconstruct(ndarray, (0,), "b") with state (1, shape, dtype, False, raw bytes)
    array = (
        P.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n" + P.GLOBAL + b"numpy\nndarray\n"
        + integer(0) + P.TUPLE1 + string(b"b") + P.TUPLE3 + P.REDUCE
        + P.MARK + integer(1) + integer(data.shape[0]) + integer(data.shape[1]) + P.TUPLE2
        + dtype + P.NEWFALSE + string(data.tobytes()) + P.TUPLE + P.BUILD
    )
    label_list = P.EMPTY_LIST + P.MARK + b"".join(integer(int(i)) for i in labels) + P.APPENDS
    return (
        P.PROTO + b"\x02" + P.EMPTY_DICT + P.MARK
        + string(b"batch_label") + string(batch_label)
        + string(b"labels") + label_list
        + string(b"data") + array
        + P.SETITEMS + P.STOP
    )
    # fmt: on


def write_cifar(directory, n=2, style="python2", seed=0):
    """Write the six CIFAR-10 batches with n images each; return {file name: (data, labels)}.

    style: "python2" mimics the official files byte for byte; "protocol2" is a Python 3 pickle
    with the same bytes keys and list labels; "python3" has str keys and array labels, as a user
    might re-save the batches.
    """
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in (*CIFAR_FILES, "test_batch"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        if style == "python2":
            payload = python2_pickle(data, labels, name.encode())
        elif style == "protocol2":
            batch = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data}
            payload = pickle.dumps(batch, protocol=2)
        else:
            payload = pickle.dumps(
                {"data": data, "labels": labels}, protocol=pickle.HIGHEST_PROTOCOL
            )
        (directory / name).write_bytes(payload)
        written[name] = (data, labels)
    return written


def check_dataset(ds: Dataset, shape, n_train, n_test):
    assert ds.train_images.shape == (n_train, *shape)
    assert ds.test_images.shape == (n_test, *shape)
    assert ds.train_labels.shape == (n_train,)
    assert ds.test_labels.shape == (n_test,)
    assert ds.train_images.dtype == ds.test_images.dtype == torch.float32
    assert ds.train_labels.dtype == ds.test_labels.dtype == torch.int64
    for images in (ds.train_images, ds.test_images):
        assert images.min() >= 0 and images.max() <= 1
    assert ds.num_classes == 10
    assert ds.image_shape == shape and ds.in_channels == shape[0]


# --------------------------------------------------------------------------- bundled subset


def test_mnist_subset():
    ds = load_mnist_subset()
    check_dataset(ds, (1, 28, 28), 8000, 2000)
    assert ds.name == "mnist_subset"
    assert float(ds.train_images.max()) == 1.0  # scaled by 255, not by the maximum
    for labels in (ds.train_labels, ds.test_labels):
        assert set(labels.tolist()) == set(range(10))  # every digit in both splits
    # The split is the file's order: first n_train images train, the rest test.
    raw = resources.files("fastsparse").joinpath("data/mnist_subset.npz").read_bytes()
    npz = np.load(io.BytesIO(raw))
    assert int(npz["n_train"]) == 8000
    images, labels = npz["images"], npz["labels"]
    torch.testing.assert_close(ds.train_images[0, 0] * 255, torch.from_numpy(images[0]).float())
    torch.testing.assert_close(ds.test_images[-1, 0] * 255, torch.from_numpy(images[-1]).float())
    assert ds.train_labels[:5].tolist() == labels[:5].tolist()
    assert ds.test_labels[:5].tolist() == labels[8000:8005].tolist()


def test_mnist_subset_licence_ships_beside_the_data():
    licence = resources.files("fastsparse").joinpath("data/mnist_subset.LICENSE").read_text()
    assert "MIT" in licence and "Juan Cazala" in licence


def test_load_dataset_default_is_the_subset():
    ds = load_dataset()
    assert ds.name == "mnist_subset" and len(ds.train_labels) == 8000
    assert "mnist_subset" in repr(ds) and "8000" in repr(ds)
    assert len(repr(ds)) < 200  # no tensor dump


def test_normalize():
    ds = load_dataset("mnist_subset", normalize=True)
    assert abs(float(ds.train_images.mean())) < 1e-4
    assert abs(float(ds.train_images.std()) - 1) < 1e-3
    # The test split uses the training statistics, so it is close to, not exactly, standard.
    raw = load_mnist_subset()
    mean, std = raw.train_images.mean(), raw.train_images.std()
    torch.testing.assert_close(ds.test_images, (raw.test_images - mean) / std)


def test_dataset_rejects_mismatched_splits():
    with pytest.raises(ValueError, match="train images"):
        Dataset(
            torch.zeros(3, 1, 2, 2),
            torch.zeros(2),
            torch.zeros(1, 1, 2, 2),
            torch.zeros(1),
            10,
            "x",
        )


# --------------------------------------------------------------------------- MNIST IDX


@pytest.mark.parametrize("gz", [False, True, "mixed"], ids=["plain", "gzip", "mixed"])
def test_load_mnist(tmp_path, gz):
    arrays = write_mnist(tmp_path, n_train=5, n_test=3, gz=gz)
    ds = load_mnist(tmp_path)
    check_dataset(ds, (1, 28, 28), 5, 3)
    assert ds.name == "mnist"
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float().div(255)
    torch.testing.assert_close(ds.train_images[:, 0], expected, rtol=0, atol=0)
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float().div(255)
    torch.testing.assert_close(ds.test_images[:, 0], expected, rtol=0, atol=0)
    assert ds.train_labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.test_labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # Same result by name, and from a str path.
    by_name = load_dataset("mnist", str(tmp_path))
    assert torch.equal(by_name.train_images, ds.train_images)


def test_load_mnist_torchvision_layout(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", gz=True)
    check_dataset(load_mnist(tmp_path), (1, 28, 28), 5, 3)


def test_mnist_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        load_mnist(missing)
    for name in MNIST_FILES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", MNIST_FILES)
def test_mnist_missing_file(tmp_path, name):
    write_mnist(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(FileNotFoundError, match=name) as info:
        load_mnist(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert all(other in str(info.value) for other in MNIST_FILES)  # says what is expected


def test_mnist_bad_magic(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[3] = 3  # claims 3 dimensions: an image file where labels belong
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*magic"):
        load_mnist(tmp_path)


def test_mnist_truncated(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*bytes"):
        load_mnist(tmp_path)


def test_mnist_empty_file(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)


@pytest.mark.parametrize(
    "payload", [b"not gzip at all", gzip.compress(b"x" * 100)[:20]], ids=["garbage", "truncated"]
)
def test_mnist_corrupt_gzip(tmp_path, payload):
    write_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(payload)
    with pytest.raises(ValueError, match="corrupt file .*train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path)


def test_mnist_label_count_mismatch(tmp_path):
    write_mnist(tmp_path, n_train=5)
    write_file(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(4, np.uint8)), gz=False)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*4 labels for 5 images"):
        load_mnist(tmp_path)


def test_mnist_label_out_of_range(tmp_path):
    write_mnist(tmp_path, n_test=3)
    labels = np.array([0, 10, 3], np.uint8)
    write_file(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(labels), gz=False)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.*labels must lie"):
        load_mnist(tmp_path)


def test_mnist_image_sizes_disagree(tmp_path):
    write_mnist(tmp_path)
    images = np.zeros((3, 32, 32), np.uint8)
    write_file(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(images), gz=False)
    with pytest.raises(ValueError, match="image size"):
        load_mnist(tmp_path)


# --------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("layout", ["batches_dir", "parent_dir"])
@pytest.mark.parametrize("style", ["python2", "protocol2", "python3"])
def test_load_cifar10(tmp_path, layout, style):
    written = write_cifar(tmp_path / "cifar-10-batches-py", n=2, style=style)
    directory = tmp_path if layout == "parent_dir" else tmp_path / "cifar-10-batches-py"
    ds = load_cifar10(directory)
    check_dataset(ds, (3, 32, 32), 10, 2)
    assert ds.name == "cifar10"
    # Batches concatenate in order 1..5; each row is 1024 red, 1024 green, 1024 blue, row-major.
    data = np.concatenate([written[name][0] for name in CIFAR_FILES])
    labels = np.concatenate([written[name][1] for name in CIFAR_FILES])
    assert ds.train_labels.tolist() == labels.tolist()
    assert ds.test_labels.tolist() == written["test_batch"][1].tolist()
    flat = torch.from_numpy(data).float().div(255)
    assert ds.train_images[3, 1, 0, 0] == flat[3, 1024]  # green, top-left
    assert ds.train_images[3, 2, 31, 31] == flat[3, 3071]  # blue, bottom-right
    assert ds.train_images[3, 0, 1, 0] == flat[3, 32]  # red, second row
    torch.testing.assert_close(ds.train_images, flat.reshape(10, 3, 32, 32), rtol=0, atol=0)
    expected = torch.from_numpy(written["test_batch"][0]).float().div(255).reshape(2, 3, 32, 32)
    torch.testing.assert_close(ds.test_images, expected, rtol=0, atol=0)
    assert torch.equal(load_dataset("cifar10", directory).train_images, ds.train_images)


def test_cifar10_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        load_cifar10(tmp_path / "nowhere")
    assert "data_batch_1" in str(info.value) and "test_batch" in str(info.value)


def test_cifar10_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*test_batch") as info:
        load_cifar10(tmp_path)
    assert "cifar-10-batches-py" in str(info.value)


def test_cifar10_missing_file(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="missing in .*: test_batch;"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize(
    "payload",
    [
        b"garbage",
        pickle.dumps([1, 2, 3]),
        pickle.dumps({"labels": [1]}),
        pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [1, 2]}),
        pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [1, 2]}),
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}),
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 12]}),
    ],
    ids=["garbage", "not_dict", "no_data", "bad_shape", "bad_dtype", "label_count", "label_range"],
)
def test_cifar10_corrupt_file(tmp_path, payload):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(payload)
    with pytest.raises(ValueError, match="corrupt file .*data_batch_3"):
        load_cifar10(tmp_path)


class _Exploit:
    """Unpickling this would create a file: the loader must refuse before running it."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_cifar10_pickle_cannot_run_code(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "test_batch").write_bytes(pickle.dumps({"data": _Exploit(marker), "labels": []}))
    with pytest.raises(ValueError, match="test_batch.*forbidden global"):
        load_cifar10(tmp_path)
    assert not marker.exists()


# --------------------------------------------------------------------------- load_dataset


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'") as info:
        load_dataset("imagenet")
    assert all(name in str(info.value) for name in DATASET_NAMES)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_load_dataset_needs_directory(name):
    with pytest.raises(ValueError, match="needs a directory"):
        load_dataset(name)


def test_load_dataset_subset_takes_no_directory(tmp_path):
    with pytest.raises(ValueError, match="takes no directory"):
        load_dataset("mnist_subset", tmp_path)
