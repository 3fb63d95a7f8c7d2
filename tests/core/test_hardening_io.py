"""Files and errors after issue 22 (minor items) and issue 21 item 6: result files respect the umask, a full disk is
named in the package's words, a checkpoint carries the digest of its own payload, ``raise ... from None`` hides its
context in the framed error, and the optional divergence stop of ``NonFiniteGuard``."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import struct
import subprocess
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import NonFiniteGuard
from lightning_methods.callbacks.nonfinite_guard import DivergedTrainingError
from lightning_methods.checkpoint_io import (
    DIGEST_KEY,
    CorruptCheckpointError,
    SafeCheckpointIO,
    checksum_path,
    payload_digest,
    read_checkpoint,
    verify_embedded_digest,
    write_checkpoint,
)
from lightning_methods.cli_runs import print_package_error
from lightning_methods.datamodules import DigitsDataModule
from lightning_methods.runs import RunLockedError, StagedRun
from lightning_methods.utils.io import DiskFullError, atomic_write_json, atomic_write_text

from helpers import TinyNet, quiet_trainer


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path, mask):
    """mkstemp makes 0600 files; every atomic write now gets 0666 & ~umask, as open() would."""
    with umask(mask):
        with open(tmp_path / "plain.txt", "w") as f:  # what the user expects: the same as any new file
            f.write("x")
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "results.json", {"a": 1})
        write_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "last.ckpt")
        write_checkpoint({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "last.ckpt")  # overwrite: previous kept
    expected = 0o666 & ~mask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == expected
    for name in (
        "a.txt",
        "results.json",
        "last.ckpt",
        "last.ckpt.sha256",
        "previous-last.ckpt",
        "previous-last.ckpt.sha256",
    ):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def _tensor_data_offsets(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of every stored tensor record of a torch zip file, from the zip's own local headers."""
    out = []
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename and info.compress_type == zipfile.ZIP_STORED and info.file_size:
                name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
                out.append((info.header_offset + 30 + name_len + extra_len, info.file_size))
    return out


def test_a_copy_without_its_sidecar_is_verified_by_the_digest_inside(tmp_path):
    torch.manual_seed(0)
    state = {
        "state_dict": {"w": torch.randn(64, 32), "b": torch.randn(32).to(torch.bfloat16)},
        "epoch": 3,
        "hparams": {"lr": 0.1, "betas": (0.9, 0.99), "name": "x", "none": None},
    }
    original = write_checkpoint(state, tmp_path / "run/last.ckpt")
    assert DIGEST_KEY not in state  # the caller's dict is not changed
    stored = torch.load(original, weights_only=True)
    assert stored[DIGEST_KEY] == payload_digest(state) == payload_digest(stored)  # the digest covers the payload

    copy = tmp_path / "copy/last.ckpt"
    copy.parent.mkdir()
    shutil.copyfile(original, copy)  # copied without its .sha256
    assert not checksum_path(copy).exists()
    loaded = read_checkpoint(copy)
    assert DIGEST_KEY not in loaded and torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])
    assert verify_embedded_digest(copy) is True

    # one flipped low mantissa bit in the middle of the largest tensor: a finite, plausible value
    offset, size = max(_tensor_data_offsets(copy), key=lambda item: item[1])
    data = bytearray(copy.read_bytes())
    data[offset + size // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    flipped = torch.load(copy, weights_only=True)  # torch itself loads it silently ...
    assert torch.isfinite(flipped["state_dict"]["w"]).all()
    assert not torch.equal(flipped["state_dict"]["w"], state["state_dict"]["w"])
    with pytest.raises(CorruptCheckpointError, match="differ from the SHA-256 digest stored inside it"):
        read_checkpoint(copy)  # ... the package does not
    with pytest.raises(CorruptCheckpointError, match=str(copy)):
        SafeCheckpointIO().load_checkpoint(copy)
    with pytest.raises(CorruptCheckpointError):
        verify_embedded_digest(copy)


def test_payload_digest_tells_containers_and_values_apart():
    base = {"a": [1, 2], "t": torch.arange(4, dtype=torch.float32)}
    variants = [
        {"a": (1, 2), "t": base["t"]},
        {"a": [1, 2], "t": torch.arange(4, dtype=torch.float64)},
        {"a": [1, 2], "t": base["t"].reshape(2, 2)},
        {"a": [1, 3], "t": base["t"]},
        {"a": ["1", 2], "t": base["t"]},
        {"t": base["t"], "a": [1, 2]},
    ]
    digests = {payload_digest(v) for v in variants}
    assert payload_digest(base) not in digests and len(digests) == len(variants)
    assert payload_digest(base) == payload_digest(
        {"a": [1, 2], "t": torch.arange(4, dtype=torch.float32), DIGEST_KEY: "ignored"}
    )


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (root only)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "full"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_names_the_file_and_keeps_the_previous_one(small_tmpfs):
    path = small_tmpfs / "checkpoints/last.ckpt"
    write_checkpoint({"state_dict": {"w": torch.ones(1000)}}, path)  # 4 kB: fits
    good = path.read_bytes()
    with pytest.raises(DiskFullError, match=f"no space left on device while writing {path}") as info:
        write_checkpoint({"state_dict": {"w": torch.ones(200_000)}}, path)  # 800 kB: does not
    assert path.read_bytes() == good and read_checkpoint(path)["state_dict"]["w"].numel() == 1000
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no partial file left behind
    with pytest.raises(DiskFullError, match="no space left on device while writing"):
        atomic_write_text(small_tmpfs / "results.json", "x" * 400_000)
    out = io.StringIO()
    assert print_package_error(info.value, file=out)
    last = out.getvalue().rstrip().splitlines()[-2]  # the framed line of the package
    assert last.startswith(f"lightning-methods: error: DiskFullError: no space left on device while writing {path}")


def test_the_framed_error_is_the_one_raised_from_none(tmp_path):
    """The lock error is raised `from None` inside `except FileExistsError`: the frame shows RunLockedError."""
    run_dir = tmp_path / "grid"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(f'{{"pid": {os.getpid()}, "host": "{socket.gethostname()}"}}')  # a live holder
    with pytest.raises(RunLockedError) as info:
        StagedRun(run_dir, "demo", {}).open()
    assert isinstance(info.value.__context__, FileExistsError) and info.value.__suppress_context__
    out = io.StringIO()
    assert print_package_error(info.value, file=out)
    framed = out.getvalue().rstrip().splitlines()[-2]
    assert framed.startswith("lightning-methods: error: RunLockedError: ") and f"process {os.getpid()}" in framed


def _fit_digits(lr: float, guard: NonFiniteGuard, epochs: int = 2) -> L.Trainer:
    L.seed_everything(0)
    model = ImageClassifier(TinyNet(10), 10, optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    trainer = quiet_trainer(max_epochs=epochs, limit_train_batches=10, callbacks=[guard])
    trainer.fit(model, DigitsDataModule(batch_size=32, seed=0))
    return trainer


def test_the_divergence_stop_is_off_by_default_and_stops_a_finite_blow_up(one_thread):
    """SGD with lr 1000 on the digits: the loss grows from 2.3 to ~1e19 and falls back to hundreds, finite all along
    (the KOALA++ lr 1000 case of issue 22). The default guard lets it finish; with divergence_factor 100 it stops."""
    trainer = _fit_digits(1000.0, NonFiniteGuard())
    assert trainer.global_step == 20  # finished, although it diverged
    with pytest.raises(DivergedTrainingError, match=r"exceeded divergence_factor 100 x its running minimum") as info:
        _fit_digits(1000.0, NonFiniteGuard(divergence_factor=100))
    assert "SGD(lr=1000" in str(info.value) and "global step" in str(info.value)
    # a sane learning rate never trips it (the loss only falls, or rises by far less than 100x)
    assert _fit_digits(0.05, NonFiniteGuard(divergence_factor=100)).global_step == 20
    with pytest.raises(ValueError, match="divergence_factor must be > 1"):
        NonFiniteGuard(divergence_factor=0.5)


def test_the_divergence_rule_on_a_known_loss_sequence():
    """The smoothed loss and its minimum against values computed by hand (beta 0.5, floor 0.1, factor 10)."""
    guard = NonFiniteGuard(divergence_factor=10, divergence_smoothing=0.5, divergence_floor=0.1)
    losses = [2.0, 1.0, 0.02, 0.02, 0.6, 3.0, 12.0]
    # ema: 2, 1.5, 0.76, 0.39, 0.495, 1.7475, 6.87375; min: 2, 1.5, 0.76, 0.39, 0.39, 0.39, 0.39 -> limit 3.9
    flags = [bool(guard._diverged(torch.tensor(v))) for v in losses]
    assert flags == [False, False, False, False, False, False, True]
    assert float(guard._ema) == pytest.approx(6.87375, rel=1e-6) and float(guard._ema_min) == pytest.approx(0.39)


def test_the_divergence_check_resumes_with_its_smoothed_loss_and_minimum(tmp_path, one_thread):
    """The smoothed loss and its running minimum are checkpointed: a run resumed after the loss fell keeps the low
    minimum, so it stops where the uninterrupted run stops. Loss sequence of the test above, split after step 4:
    uninterrupted, the smoothed loss at the last step is 4.87 > 10 x 0.39; a guard that forgot the past would start
    again at 0.6 (ema 0.6, 1.8, 4.9 against 10 x 0.6) and not stop."""
    first, rest = [2.0, 1.0, 0.02, 0.02], [0.6, 3.0, 8.0]
    settings = dict(divergence_factor=10, divergence_smoothing=0.5, divergence_floor=0.1)
    whole = NonFiniteGuard(**settings)
    assert [bool(whole._diverged(torch.tensor(v))) for v in first + rest][-3:] == [False, False, True]
    before = NonFiniteGuard(**settings)
    for v in first:
        before._diverged(torch.tensor(v))
    module = ImageClassifier(TinyNet(10), 10)  # on_train_start reads its device
    for state, expect in ((before.state_dict(), [False, False, True]), ({}, [False, False, False])):
        after = NonFiniteGuard(**settings)
        after.load_state_dict(state)
        after.on_train_start(None, module)
        assert [bool(after._diverged(torch.tensor(v))) for v in rest] == expect

    # through a real checkpoint: the state saved with the weights is the state a resumed fit starts from
    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.ema = [float(guard._ema), float(guard._ema_min)]

    ckpt = tmp_path / "one.ckpt"
    trainer = _fit_digits(0.05, NonFiniteGuard(divergence_factor=100), epochs=1)
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["NonFiniteGuard"]
    saved_guard = next(cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard))
    assert saved["ema"] == float(saved_guard._ema) and saved["ema_min"] <= saved["ema"]
    guard, probe = NonFiniteGuard(divergence_factor=100), AtStart()
    model = ImageClassifier(TinyNet(10), 10, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    quiet_trainer(max_epochs=2, limit_train_batches=10, callbacks=[guard, probe]).fit(
        model, DigitsDataModule(batch_size=32, seed=0), ckpt_path=ckpt)
    assert probe.ema == [saved["ema"], saved["ema_min"]]  # float32 values: exact through a Python float
