"""Gaps found by mutation testing of the ViT-locality callback: the step of the last probe is part of the state, so a
resume of a finished run does not probe the same weights a second time at fit end."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from vit_locality_helpers import RandomImages, tiny_classifier

from lightning_methods.callbacks import AttentionLocality
from lightning_methods.vit_locality.settings import LocalitySettings

from helpers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_last_probe_step_round_trips_and_a_finished_run_is_not_probed_again(tmp_path):
    """The state holds the global step of the last probe; loading it back gives the same state. Resuming a run that
    already finished (its last.ckpt, same max_epochs) trains nothing, so fit end finds the step of the last probe and
    adds no second probe of the same weights (the history and history.csv keep one entry)."""

    def run(ckpt_path: str | None = None) -> AttentionLocality:
        probe = AttentionLocality(settings=LocalitySettings(num_images=4), every_n_epochs=1, num_map_images=0,
                                  out_dir=str(tmp_path / "out"))
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, callbacks=[probe, ckpt],
                                enable_checkpointing=True)
        trainer.fit(tiny_classifier(seed=4), RandomImages(), ckpt_path=ckpt_path)
        return probe

    first = run()
    state = first.state_dict()
    assert len(first.history) == 1 and state["last_step"] == first.history[0]["global_step"] == 1
    fresh = AttentionLocality(settings=LocalitySettings(num_images=4), every_n_epochs=1)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    resumed = run(str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.history == first.history
    assert len((tmp_path / "out" / "history.csv").read_text().splitlines()) == 2  # header + one probe
