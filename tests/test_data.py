"""Tests for lpld_ray.data.datasets: Fashion-MNIST idx parsing, digits, image folders, class access, normalisation."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lpld_ray.config import DataConfig
from lpld_ray.config_io import replace
from lpld_ray.data.datasets import check_dataset, load_dataset, read_both_splits
from lpld_ray.errors import DataError
from lpld_ray.method.images import ImageSpec, denormalize, normalize
from lpld_ray.store.storage import Store

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
needs_fashion = pytest.mark.skipif(not (FASHION_ROOT / FASHION_FILES[0]).is_file(), reason="Fashion-MNIST not installed")


@pytest.fixture(scope="module")
def fashion_train():
    return load_dataset(DataConfig(), "train")


@pytest.fixture(scope="module")
def fashion_test():
    return load_dataset(DataConfig(), "test")


@needs_fashion
def test_fashion_train_counts_and_values(fashion_train):
    ds = fashion_train
    assert len(ds) == 60000 and ds.num_classes == 10 and len(ds.class_names) == 10
    assert ds.targets.dtype == torch.int64
    assert torch.bincount(ds.targets).tolist() == [6000] * 10
    assert (ds.spec.channels, ds.spec.size) == (1, 28)
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert y == 9  # the first Fashion-MNIST training image is an ankle boot
    batch = ds.class_images(0, 500)
    assert batch.min() >= 0 and batch.max() <= 1 and batch.max() == 1.0
    assert torch.equal((x * 255).round(), x * 255)  # exact uint8 / 255


@needs_fashion
def test_fashion_test_split(fashion_test):
    assert len(fashion_test) == 10000
    assert torch.bincount(fashion_test.targets).tolist() == [1000] * 10


@needs_fashion
def test_indices_of_class(fashion_train):
    ds = fashion_train
    idx = ds.indices_of_class(3)
    assert idx.dtype == torch.int64 and idx.numel() == 6000
    assert bool((ds.targets[idx] == 3).all())
    assert bool((idx[1:] > idx[:-1]).all())  # file order
    assert int((ds.targets == 3).sum()) == idx.numel()


@needs_fashion
def test_class_images_first_random_and_too_many(fashion_train):
    ds = fashion_train
    idx = ds.indices_of_class(2)
    first = ds.class_images(2, 5)
    assert first.shape == (5, 1, 28, 28)
    assert torch.equal(first, torch.stack([ds[int(i)][0] for i in idx[:5]]))
    a = ds.class_images(2, 5, generator=torch.Generator().manual_seed(0))
    b = ds.class_images(2, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, first)
    with pytest.raises(DataError, match="6000 images but 6001"):
        ds.class_images(2, 6001)


@needs_fashion
def test_num_classes_and_train_per_class(fashion_train):
    cfg = DataConfig(num_classes=3, train_per_class=50)
    ds = load_dataset(cfg, "train")
    assert len(ds) == 150 and ds.num_classes == 3 and len(ds.class_names) == 3
    assert torch.bincount(ds.targets).tolist() == [50, 50, 50]
    for c in range(3):  # the first 50 of each class, in file order
        assert torch.equal(ds.class_images(c, 50), fashion_train.class_images(c, 50))
    test = load_dataset(cfg, "test")  # train_per_class does not apply to test
    assert len(test) == 3000 and int(test.targets.max()) == 2
    full_test = test
    test = load_dataset(replace(cfg, test_per_class=20), "test")  # the first 20 test images of each class
    assert torch.bincount(test.targets).tolist() == [20, 20, 20] and load_dataset(replace(cfg, test_per_class=20), "train").targets.numel() == 150
    for c in range(3):
        assert torch.equal(test.class_images(c, 20), full_test.class_images(c, 20))


@needs_fashion
def test_num_classes_too_large():
    cfg = DataConfig(num_classes=11)
    with pytest.raises(DataError) as err:
        check_dataset(cfg)
    assert "11" in str(err.value) and "10" in str(err.value)
    with pytest.raises(DataError, match="11"):
        load_dataset(cfg, "test")


@needs_fashion
def test_check_dataset_ok():
    check_dataset(DataConfig())
    check_dataset(DataConfig(name="digits", num_classes=5))


def test_missing_root_is_one_line(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        check_dataset(DataConfig(root=str(root)))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (f"dataset files missing: '{root / 'train-images-idx3-ubyte.gz'}' not found "
                   "(set data.root to the folder holding the Fashion-MNIST idx files)")
    with pytest.raises(DataError, match="dataset files missing"):
        load_dataset(DataConfig(root=str(root)), "train")


def test_bad_split():
    with pytest.raises(DataError, match="'val'.*train, test"):
        load_dataset(DataConfig(), "val")


def _fake_fashion(tmp_path: Path, images_bytes: bytes) -> Path:
    for name in FASHION_FILES:
        (tmp_path / name).write_bytes(images_bytes)
    return tmp_path


def test_garbage_gz_is_data_error(tmp_path):
    root = _fake_fashion(tmp_path, b"this is not gzip at all" * 10)
    check_dataset(DataConfig(root=str(root)))  # pre-flight only checks existence
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(root=str(root)), "train")
    assert "train-images-idx3-ubyte.gz" in str(err.value) and "\n" not in str(err.value)


def test_wrong_magic_and_truncated_idx(tmp_path):
    root = _fake_fashion(tmp_path, gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 20))
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        load_dataset(DataConfig(root=str(root)), "test")
    header = (2051).to_bytes(4, "big") + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + b"\x00" * 100))
    with pytest.raises(DataError, match="t10k-images.*data bytes"):
        load_dataset(DataConfig(root=str(root)), "test")


def test_digits():
    pytest.importorskip("sklearn")
    train = load_dataset(DataConfig(name="digits"), "train")
    test = load_dataset(DataConfig(name="digits"), "test")
    assert train.num_classes == 10 and test.num_classes == 10
    assert len(train) + len(test) == 1797
    counts = torch.bincount(train.targets) + torch.bincount(test.targets)
    assert torch.equal(torch.bincount(train.targets), (counts.double() * 0.8).floor().long())
    x, y = train[0]
    assert x.shape == (1, 8, 8) and train.spec.size == 8 and 0 <= y < 10
    batch = train.class_images(1, 100)
    assert batch.min() >= 0 and batch.max() == 1.0
    small = load_dataset(DataConfig(name="digits", num_classes=4, train_per_class=7), "train")
    assert torch.bincount(small.targets).tolist() == [7] * 4


def _write_folder(root: Path, classes: list[str], per_split: dict[str, int], size: int = 32) -> None:
    """Real Fashion-MNIST images (or noise without the dataset), upscaled to ``size`` px RGB PNGs."""
    if (FASHION_ROOT / FASHION_FILES[0]).is_file():
        source = load_dataset(DataConfig(num_classes=len(classes), train_per_class=10), "train")
        pick = lambda c, i: source.class_images(c, 10)[i, 0]  # noqa: E731
    else:
        pick = lambda c, i: torch.rand(28, 28)  # noqa: E731
    for split, count in per_split.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                arr = (pick(c, i + (5 if split == "val" else 0)) * 255).round().byte().numpy()
                img = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
                img.save(folder / f"img{i:03d}.png")


def test_image_folder(tmp_path):
    classes = ["c_pullover", "a_tshirt", "b_trouser"]
    _write_folder(tmp_path, classes, {"train": 4, "val": 2})
    cfg = DataConfig(name="image_folder", root=str(tmp_path), image_size=32)
    check_dataset(cfg)
    train = load_dataset(cfg, "train")
    assert train.class_names == sorted(classes) and len(train) == 12
    assert train.spec == ImageSpec(3, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x, y = train[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    stored = np.array(Image.open(tmp_path / "train" / "b_trouser" / "img001.png"))
    assert torch.allclose(x, torch.from_numpy(stored).permute(2, 0, 1).float() / 255)
    assert train.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    val = load_dataset(cfg, "test")
    assert len(val) == 6 and val.targets.tolist() == [0, 0, 1, 1, 2, 2]
    small = load_dataset(DataConfig(name="image_folder", root=str(tmp_path), image_size=16,
                                    num_classes=2, train_per_class=3), "train")
    assert len(small) == 6 and small.class_names == ["a_tshirt", "b_trouser"]
    assert small.class_images(1, 3).shape == (3, 3, 16, 16)
    assert load_dataset(replace(cfg, test_per_class=1), "test").targets.tolist() == [0, 1, 2]


def test_both_splits_list_each_folder_once_and_match_one_split_at_a_time(tmp_path, monkeypatch):
    """The start-up check lists train/'s and val/'s class folders and files once each (it listed train/'s folders
    four times: 44 of the 88 LIST pages of a 10,450-class tree on S3) and reads what load_dataset reads."""
    _write_folder(tmp_path, ["c", "a", "b"], {"train": 3, "val": 2}, size=8)
    cfg = DataConfig(name="image_folder", root=str(tmp_path), image_size=8, num_classes=2)
    calls: list[tuple[str, str]] = []
    for method in ("list", "folders"):
        original = getattr(Store, method)
        monkeypatch.setattr(Store, method, lambda self, rel, _m=method, _o=original: calls.append((_m, rel)) or _o(self, rel))
    train, test = read_both_splits(cfg)
    assert sorted(calls) == [("folders", "train"), ("folders", "val"), ("list", "train"), ("list", "val")]
    for split, ds in zip(("train", "test"), (train, test)):
        one = load_dataset(cfg, split)
        assert (ds.files, ds.targets.tolist(), ds.class_names) == (one.files, one.targets.tolist(), one.class_names)
    assert len(train) == 6 and test.targets.tolist() == [0, 0, 1, 1]
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DataError, match="no val/ folder"):
        read_both_splits(cfg)


def test_image_folder_center_crop(tmp_path):
    folder = tmp_path / "train" / "only"
    folder.mkdir(parents=True)
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, 10:30] = 255  # white centre band, 20 px wide: exactly the crop after resizing the 20 px side to 10
    Image.fromarray(arr).save(folder / "wide.png")
    (tmp_path / "val").mkdir()
    ds = load_dataset(DataConfig(name="image_folder", root=str(tmp_path), image_size=10), "train")
    x, _ = ds[0]
    assert x.shape == (3, 10, 10)
    assert x[:, :, 1:-1].min() > 0.9  # the band fills the crop (edges may blend)


def test_image_folder_errors(tmp_path):
    cfg = DataConfig(name="image_folder", root=str(tmp_path), image_size=16)
    with pytest.raises(DataError, match="no train/ folder"):
        check_dataset(cfg)
    _write_folder(tmp_path, ["x", "y"], {"train": 1})
    with pytest.raises(DataError, match="no val/ folder"):
        check_dataset(cfg)
    with pytest.raises(DataError, match="num_classes is 3.*2 classes"):
        check_dataset(DataConfig(name="image_folder", root=str(tmp_path), num_classes=3))
    (tmp_path / "val" / "z").mkdir(parents=True)
    with pytest.raises(DataError, match="val/z"):
        load_dataset(cfg, "test")
    shutil.rmtree(tmp_path / "val" / "z")
    assert len(load_dataset(cfg, "test")) == 0
    (tmp_path / "train" / "y" / "img000.png").write_bytes(b"not a png")
    ds = load_dataset(cfg, "train")
    with pytest.raises(DataError, match="cannot decode image .*img000.png"):
        ds[1]


def test_normalize_round_trip():
    spec = ImageSpec(3, 4, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = torch.rand(2, 3, 4, 4)
    z = normalize(x, spec)
    assert torch.allclose(z[:, 1], (x[:, 1] - 0.456) / 0.224)
    assert torch.allclose(denormalize(z, spec), x, atol=1e-6)
    assert torch.allclose(denormalize(normalize(x[0], spec), spec), x[0], atol=1e-6)
    mean_img = torch.tensor(spec.mean).view(3, 1, 1).expand(3, 4, 4)
    assert torch.allclose(normalize(mean_img, spec), torch.zeros(3, 4, 4), atol=1e-6)
    with pytest.raises(ValueError):
        normalize(torch.rand(2, 1, 4, 4), spec)


def test_image_folder_on_s3_reads_the_same_images_as_on_disk(tmp_path, moto_s3):
    """The tree uploaded to moto's S3: one listing per split, the same files, labels and decoded pixels."""
    from lpld_ray.store.storage import Store

    classes = ["a_tshirt", "b_trouser", "c_pullover"]
    _write_folder(tmp_path, classes, {"train": 3, "val": 2})
    root = f"s3://{moto_s3.make_bucket()}/fm"
    remote = Store(root, moto_s3.options())
    for path in sorted(p for p in tmp_path.rglob("*.png")):
        remote.write_bytes(str(path.relative_to(tmp_path)), path.read_bytes())
    for split in ("train", "test"):
        local = load_dataset(DataConfig(name="image_folder", root=str(tmp_path), image_size=16), split)
        cfg = DataConfig(name="image_folder", root=root, image_size=16)
        check_dataset(cfg, moto_s3.options())
        s3 = load_dataset(cfg, split, moto_s3.options())
        assert s3.class_names == local.class_names == classes and s3.files == local.files
        assert torch.equal(s3.targets, local.targets)
        assert torch.equal(s3.images(torch.arange(len(s3))), local.images(torch.arange(len(local))))
    with pytest.raises(DataError, match=r"has no train/ folder"):
        check_dataset(DataConfig(name="image_folder", root=root + "-missing"), moto_s3.options())


def test_image_folder_batches_decode_in_threads_and_pickle_without_their_store(tmp_path):
    import pickle

    from torch.utils.data import DataLoader

    _write_folder(tmp_path, ["x", "y"], {"train": 5, "val": 1})
    ds = load_dataset(DataConfig(name="image_folder", root=str(tmp_path), image_size=16), "train")
    ds.decode_threads = 4
    one_by_one = torch.stack([ds[i][0] for i in range(len(ds))])
    calls, threaded = [], ds.__getitems__
    ds.__getitems__ = lambda idx: calls.append(len(idx)) or threaded(idx)
    batched = torch.cat([x for x, _ in DataLoader(ds, batch_size=4)])
    del ds.__getitems__
    assert calls == [4, 4, 2] and torch.equal(batched, one_by_one)  # DataLoader asks for whole batches
    assert [y for _, y in ds.__getitems__([9, 0, 5])] == [1, 0, 1]
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.store == ds.store and copy.store._opened is None  # the filesystem is reopened on first use
    assert torch.equal(copy[3][0], one_by_one[3]) and copy.store._opened is not None
    half = ds.subset(torch.arange(5, 10))
    assert half.files == ds.files[5:] and torch.equal(half.images(torch.arange(5)), one_by_one[5:])


def test_image_folder_on_s3_holds_one_store_and_pickles_without_the_secret(tmp_path, moto_s3):
    """A split holds the Store it was listed with; a pickled copy (a DataLoader worker, a Ray task) reads the same
    pixels, and the pickle does not carry the secret key in clear."""
    import pickle

    from lpld_ray.store.storage import Store

    _write_folder(tmp_path, ["x", "y"], {"train": 2, "val": 1})
    root = f"s3://{moto_s3.make_bucket()}/fm"
    remote = Store(root, moto_s3.options())
    for path in sorted(tmp_path.rglob("*.png")):
        remote.write_bytes(str(path.relative_to(tmp_path)), path.read_bytes())
    ds = load_dataset(DataConfig(name="image_folder", root=root, image_size=16), "train", moto_s3.options())
    assert ds.store == remote and ds.root == root and ds.subset(torch.arange(2)).store is ds.store
    data = pickle.dumps(ds)
    assert moto_s3.secret_key.encode() not in data
    copy = pickle.loads(data)
    assert torch.equal(copy.images(torch.arange(len(ds))), ds.images(torch.arange(len(ds))))
