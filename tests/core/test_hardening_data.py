"""CIFAR pickles are validated and read without running code (issue 18, item 8): every data error names the file."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from lightning_methods.datamodules import CIFAR100DataModule, read_cifar_batch

from helpers import write_fake_cifar


def dump(path: Path, entry: object) -> Path:
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    return path


def entry(n: int = 8, row: int = 3072, labels: int | None = None) -> dict:
    rng = np.random.default_rng(0)
    return {"data": rng.integers(0, 256, (n, row), dtype=np.uint8), "fine_labels": list(range(labels or n))}


def test_valid_file_round_trips(tmp_path):
    e = entry()
    x, y = read_cifar_batch(dump(tmp_path / "train", e), "fine_labels", 100)
    assert x.shape == (8, 3, 32, 32) and x.dtype == np.uint8 and np.array_equal(x.reshape(8, -1), e["data"])
    assert y.dtype == np.int64 and y.tolist() == list(range(8))


def test_rows_of_the_wrong_length_are_not_reshaped(tmp_path):
    """512 rows of 3000 bytes used to become 500 images (and labels were cut to match)."""
    path = dump(tmp_path / "train", entry(n=512, row=3000))
    with pytest.raises(ValueError, match=r"shape \(512, 3000\)") as info:
        read_cifar_batch(path, "fine_labels")
    assert str(path) in str(info.value)


def test_label_count_type_and_range_are_checked(tmp_path):
    with pytest.raises(ValueError, match="8 images but 7 labels"):
        read_cifar_batch(dump(tmp_path / "a", entry(labels=7)), "fine_labels")
    bad = entry()
    bad["fine_labels"] = [0.5] * 8
    with pytest.raises(ValueError, match="list of integers"):
        read_cifar_batch(dump(tmp_path / "b", bad), "fine_labels")
    with pytest.raises(ValueError, match=r"outside \[0, 5\)") as info:
        read_cifar_batch(dump(tmp_path / "c", entry()), "fine_labels", num_classes=5)
    assert str(tmp_path / "c") in str(info.value)
    with pytest.raises(ValueError, match="'labels'.*CIFAR-10 and CIFAR-100 mixed up"):
        read_cifar_batch(dump(tmp_path / "d", entry()), "labels")


def test_truncated_pickle_names_the_file(tmp_path):
    path = dump(tmp_path / "train", entry())
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="is truncated") as info:
        read_cifar_batch(path, "fine_labels")
    assert str(path) in str(info.value)


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_crafted_pickle_never_runs_code(tmp_path):
    marker = tmp_path / "code_ran"
    e = entry()
    e["batch_label"] = RunsCode(marker)
    path = dump(tmp_path / "train", e)
    with pytest.raises(ValueError, match="which a CIFAR pickle never holds") as info:
        read_cifar_batch(path, "fine_labels")
    assert str(path) in str(info.value) and not marker.exists()


def test_datamodule_names_the_damaged_file(tmp_path):
    write_fake_cifar(tmp_path, "cifar100", n_train=20, n_test=10)
    test_file = tmp_path / "cifar-100-python" / "test"
    dump(test_file, entry(n=10, row=3000))
    dm = CIFAR100DataModule(data_dir=str(tmp_path), download=False, batch_size=4)
    with pytest.raises(ValueError, match="shape") as info:
        dm.setup("fit")
    assert str(test_file) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"not a torch file\n", bytes(range(256)) * 4, b"PK\x03\x04" + b"\x00" * 64,
                                     b"\x80\x02]q\x00(K\x01"])
def test_torch_files_of_garbage_bytes_are_one_clear_error(tmp_path, content):
    """Whatever a broken download holds (empty, text, random bytes, a cut zip header, a cut legacy pickle), loading it
    is a ValueError that names the file, never an IndexError or KeyError from torch's readers."""
    from lightning_methods.utils.io import safe_torch_load

    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="truncated or not a torch file") as info:
        safe_torch_load(path, what="teacher checkpoint")
    assert str(path) in str(info.value) and "teacher checkpoint" in str(info.value)


def test_a_truncated_real_torch_file_is_one_clear_error(tmp_path):
    import torch

    from lightning_methods.utils.io import safe_torch_load

    path = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(1000.0)}, path)
    assert torch.equal(safe_torch_load(path)["w"], torch.arange(1000.0))
    for cut in (10, len(path.read_bytes()) // 2, len(path.read_bytes()) - 30):
        full = path.read_bytes()
        (tmp_path / "cut.pt").write_bytes(full[:cut])
        with pytest.raises(ValueError, match=r"cut\.pt"):
            safe_torch_load(tmp_path / "cut.pt")


def test_a_torch_file_carrying_code_is_refused_not_called_garbage(tmp_path):
    import torch

    from lightning_methods.utils.io import safe_torch_load

    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refuses") as info:
        safe_torch_load(tmp_path / "evil.pt")
    assert "not a torch file" not in str(info.value) and not marker.exists()
