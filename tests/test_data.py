import gzip
import shutil

import pytest
import torch

import fsgeom
from fsgeom.data import MNIST_FILES, TensorLoader, ValidationStream, batches, mnist_root

from .conftest import needs_mnist


def test_digits_split_is_fixed_and_standardized():
    a, b = fsgeom.load("digits", seed=0), fsgeom.load("digits", seed=0)
    c = fsgeom.load("digits", seed=1)
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, c.train_x)
    assert a.train_x.shape == (1437, 1, 8, 8) and a.test_x.shape == (360, 1, 8, 8)
    assert a.train_y.dtype == torch.int64 and set(a.train_y.tolist()) == set(range(10))
    flat = a.train_x.reshape(len(a.train_x), -1).double()
    varying = flat.std(0) > 0
    assert torch.allclose(flat.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(
        flat.std(0, unbiased=False)[varying],
        torch.ones(int(varying.sum()), dtype=torch.float64),
        atol=1e-4,
    )


@needs_mnist
def test_mnist_loads_and_verifies():
    d = fsgeom.load("mnist")
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert d.train_y[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first labels
    assert abs(d.train_x.mean().item()) < 0.01 and abs(d.train_x.std().item() - 1) < 0.01


def _copy_mnist(tmp_path, raw=()):
    src = mnist_root()
    for stem in MNIST_FILES:
        if stem in raw:
            (tmp_path / stem).write_bytes(gzip.decompress((src / f"{stem}.gz").read_bytes()))
        else:
            shutil.copy(src / f"{stem}.gz", tmp_path / f"{stem}.gz")


@needs_mnist
def test_mnist_raw_files_verify_too(tmp_path):
    _copy_mnist(tmp_path, raw=("t10k-labels-idx1-ubyte", "train-labels-idx1-ubyte"))
    d = fsgeom.load("mnist", root=tmp_path)
    assert len(d.test_y) == 10000


@needs_mnist
def test_mnist_corrupt_and_truncated_files_are_refused(tmp_path):
    _copy_mnist(tmp_path, raw=("t10k-labels-idx1-ubyte",))
    path = tmp_path / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.*MD5"):
        fsgeom.load("mnist", root=tmp_path)
    gz = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.unlink()
    gz.write_bytes((mnist_root() / "t10k-labels-idx1-ubyte.gz").read_bytes()[:2000])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        fsgeom.load("mnist", root=tmp_path)


def test_mnist_missing_files_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("FSGEOM_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        fsgeom.load("mnist")
    msg = str(e.value)
    assert str(tmp_path / "mnist") in msg and "download=True" in msg and "FSGEOM_DATA" in msg


def test_md5_table_matches_shared_checksums():
    listed = mnist_root().parent / "mnist" / "MD5SUMS.uncompressed"
    if not listed.is_file():
        pytest.skip("MD5SUMS.uncompressed not found beside the MNIST files")
    table = dict(line.split()[::-1] for line in listed.read_text().splitlines() if line.strip())
    assert table == MNIST_FILES


def test_idx_parser_rejects_header_mismatch(tmp_path):
    from fsgeom.data import _parse_idx

    raw = b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01\x02\x03"
    with pytest.raises(ValueError, match="header announces"):
        _parse_idx(raw, tmp_path / "x")


def test_batches_accepts_every_data_form():
    x, y = torch.randn(10, 3), torch.arange(10)
    assert len(list(batches(x))) == 1 and list(batches(x))[0][1] is None
    ((bx, by),) = list(batches((x, y)))
    assert bx is x and by is y
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    assert [b[0].shape[0] for b in batches(loader)] == [4, 4, 2]
    assert [b[0].shape[0] for b in batches([x[:3], x[3:]])] == [3, 7]
    with pytest.raises(ValueError, match="batch 1 has no targets"):
        list(batches([(x, y), x], need_targets=True))
    with pytest.raises(ValueError, match="empty"):
        list(batches(iter([])))
    with pytest.raises(ValueError, match="3 inputs but 2 targets"):
        list(batches((x[:3], y[:2])))


def test_tensor_loader_covers_each_example_once_per_epoch():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    loader = TensorLoader(x, y, batch_size=4, seed=0)
    assert len(loader) == 3
    e1 = torch.cat([b[1] for b in loader])
    e2 = torch.cat([b[1] for b in loader])
    assert sorted(e1.tolist()) == list(range(10)) and not torch.equal(e1, e2)
    again = torch.cat([b[1] for b in TensorLoader(x, y, batch_size=4, seed=0)])
    assert torch.equal(e1, again)


def test_validation_stream_is_endless_seeded_and_resumable():
    x = torch.arange(10).float()[:, None]
    s = ValidationStream(x, batch_size=4, seed=3)
    first = [next(s) for _ in range(2)]
    assert torch.cat(first).unique().numel() == 8  # without replacement within a pass
    state = s.state_dict()
    nxt = [next(s) for _ in range(5)]
    s.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(nxt, [next(s) for _ in range(5)]))
    with pytest.raises(ValueError, match="batch_size"):
        ValidationStream(x, batch_size=11)
