"""Crash-safe, verified checkpoints (issue 18, items 2, 6, 7): atomic writes with a recorded checksum, the previous
``last.ckpt`` kept, corrupt / truncated / non-finite / code-carrying files refused with an error naming the file and
the previous good checkpoint."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from lightning_methods.callbacks import LatestCheckpoint
from lightning_methods.checkpoint_io import (
    CorruptCheckpointError,
    NonFiniteCheckpointError,
    SafeCheckpointIO,
    checksum_path,
    read_checkpoint,
    recorded_hashes,
    write_checkpoint,
)
from lightning_methods.utils.io import sha256_file

from helpers import Worsening, quiet_trainer, tiny_loader


def state(value: float, epoch: int | None = None) -> dict:
    epoch = int(value) if epoch is None else epoch
    return {"state_dict": {"w": torch.full((3, 3), value), "steps": torch.tensor(4)}, "epoch": epoch}


def flip_byte(path, offset: int = -200) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_write_records_a_sha256sum_checksum_and_keeps_the_previous_version(tmp_path):
    path = tmp_path / "last.ckpt"
    write_checkpoint(state(1.0), path)
    first = path.read_bytes()
    assert checksum_path(path).read_text() == f"{sha256_file(path)}  last.ckpt\n"  # `sha256sum -c` format
    write_checkpoint(state(2.0), path)
    assert read_checkpoint(path)["epoch"] == 2
    previous = tmp_path / "previous-last.ckpt"
    assert previous.read_bytes() == first and read_checkpoint(previous)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256", "previous-last.ckpt",
                                                          "previous-last.ckpt.sha256"]  # no temporary files left


def test_flipped_bytes_are_refused_naming_the_previous_good_checkpoint(tmp_path):
    """A checkpoint with flipped bytes used to load silently (and gave NaN test results with rc 0)."""
    path = tmp_path / "last.ckpt"
    write_checkpoint(state(1.0), path)
    write_checkpoint(state(2.0), path)
    flip_byte(path)
    with pytest.raises(CorruptCheckpointError, match="differs from the one recorded") as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and f"--ckpt_path {tmp_path / 'previous-last.ckpt'}" in message


def test_truncated_file_without_checksum_is_a_clear_error(tmp_path):
    torch.save(state(1.0), tmp_path / "other.ckpt")
    data = (tmp_path / "other.ckpt").read_bytes()
    (tmp_path / "other.ckpt").write_bytes(data[: len(data) // 2])
    write_checkpoint(state(0.0), tmp_path / "best.ckpt")
    with pytest.raises(CorruptCheckpointError, match="truncated or unreadable") as info:
        read_checkpoint(tmp_path / "other.ckpt")
    assert f"--ckpt_path {tmp_path / 'best.ckpt'}" in str(info.value)


def test_a_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    """What a full disk did: the write fails midway; last.ckpt must keep the previous state."""
    path = tmp_path / "last.ckpt"
    write_checkpoint(state(1.0), path)
    before = path.read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=f"no space left on device while writing {path}") as info:
        write_checkpoint(state(2.0), path)
    assert info.value.errno == 28 and type(info.value).__name__ == "DiskFullError"  # named in the package's words
    monkeypatch.undo()
    assert path.read_bytes() == before and read_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]


def test_a_kill_between_the_two_renames_never_makes_a_good_file_look_corrupt(tmp_path, monkeypatch):
    import os

    path = tmp_path / "last.ckpt"
    write_checkpoint(state(1.0), path)

    real_replace = os.replace

    def killed_at_the_checkpoint_rename(src, dst):
        if str(dst) == str(path):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_checkpoint_rename)  # after the sidecar lists both hashes
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(state(2.0), path, keep_previous=False)
    monkeypatch.undo()
    assert len(recorded_hashes(path)) == 2 and read_checkpoint(path)["epoch"] == 1


def test_non_finite_weights_are_never_written_or_loaded(tmp_path):
    path = tmp_path / "last.ckpt"
    write_checkpoint(state(1.0), path)
    before = path.read_bytes()
    with pytest.raises(NonFiniteCheckpointError, match=r"refusing to write .*last.ckpt.*in 1 tensor\(s\) \(w\)"):
        write_checkpoint(state(float("nan"), epoch=2), path)
    assert path.read_bytes() == before
    torch.save(state(float("inf"), epoch=3), tmp_path / "foreign.ckpt")
    with pytest.raises(NonFiniteCheckpointError, match="holds non-finite weights") as info:
        read_checkpoint(tmp_path / "foreign.ckpt")
    assert f"--ckpt_path {path}" in str(info.value)


class RunsCode:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (self.marker,)


def test_checkpoints_never_run_code_unless_explicitly_allowed(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({**state(1.0), "extra": RunsCode(marker)}, tmp_path / "crafted.ckpt")
    for weights_only in (None, True):  # None (Lightning's default) means weights-only here
        with pytest.raises(ValueError, match="--weights_only false"):
            read_checkpoint(tmp_path / "crafted.ckpt", weights_only=weights_only)
    assert not marker.exists()
    with pytest.warns(UserWarning, match="weights_only=False"):
        read_checkpoint(tmp_path / "crafted.ckpt", weights_only=False)
    assert marker.exists()


def test_latest_checkpoint_installs_the_plugin_and_resume_refuses_a_corrupt_last_ckpt(tmp_path, one_thread):
    ckpt = LatestCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best-{epoch:03d}",
                            auto_insert_metric_name=False)
    trainer = quiet_trainer(max_epochs=3, enable_checkpointing=True, limit_val_batches=1, callbacks=[ckpt],
                            default_root_dir=tmp_path)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    trainer.fit(Worsening(), tiny_loader(), tiny_loader())
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)
    last = tmp_path / "last.ckpt"
    assert recorded_hashes(last) == [sha256_file(last)] and read_checkpoint(last)["epoch"] == 2
    assert read_checkpoint(tmp_path / "previous-last.ckpt")["epoch"] == 1
    assert (tmp_path / "best-000.ckpt.sha256").is_file()
    flip_byte(last)
    resume = quiet_trainer(max_epochs=4, enable_checkpointing=True, limit_val_batches=1,
                           callbacks=[LatestCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")])
    with pytest.raises(CorruptCheckpointError, match="previous-last.ckpt"):
        resume.fit(Worsening(), tiny_loader(), tiny_loader(), ckpt_path=str(last))


def test_removed_top_k_checkpoints_take_their_checksum_with_them(tmp_path, one_thread):
    class Improving(Worsening):
        def validation_step(self, batch, batch_idx):
            self.log("val/acc", float(self.current_epoch))

    ckpt = LatestCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best-{epoch}",
                            auto_insert_metric_name=False)
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    quiet_trainer(max_epochs=3, enable_checkpointing=True, limit_val_batches=1, callbacks=[ckpt]).fit(Improving(), data,
                                                                                                       data)
    assert sorted(p.name for p in tmp_path.glob("best-*")) == ["best-2.ckpt", "best-2.ckpt.sha256"]
