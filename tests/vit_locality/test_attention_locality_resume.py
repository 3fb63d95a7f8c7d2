"""AttentionLocality on resume: with validation every other epoch, the checkpoint of epoch k is written at validation
end (before ``on_train_epoch_end``); a resume from it must still have epoch k's probe in the history."""

from __future__ import annotations

import pytest
from vit_locality_helpers import RandomImages, tiny_classifier

from lightning_methods.callbacks import AttentionLocality, LatestCheckpoint
from lightning_methods.vit_locality.settings import LocalitySettings

from helpers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resume_after_validation_checkpoint_keeps_the_history(tmp_path):
    def run(max_epochs: int, folder: str, ckpt_path: str | None = None) -> AttentionLocality:
        probe = AttentionLocality(settings=LocalitySettings(num_images=6), every_n_epochs=1, num_map_images=0,
                                  out_dir=str(tmp_path / folder))
        ckpt = LatestCheckpoint(dirpath=tmp_path / folder / "ckpt", monitor="val/acc", mode="max", safe_io=False)
        trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[probe, ckpt], enable_checkpointing=True,
                                limit_val_batches=1, check_val_every_n_epoch=2)
        trainer.fit(tiny_classifier(seed=2), RandomImages(), ckpt_path=ckpt_path)
        return probe

    full = run(3, "full")
    run(2, "part")
    resumed = run(3, "part", str(tmp_path / "part" / "ckpt" / "last.ckpt"))
    assert [r["epoch"] for r in full.history] == [1, 2, 3]
    assert resumed.history == full.history
    assert len((tmp_path / "part" / "history.csv").read_text().splitlines()) == 4
