"""TestAccuracyTracker's schedule: every ``every_n_epochs`` epochs, at a new best validation epoch and at the last
epoch, also when the run is limited by ``max_steps`` (Lightning's ``max_epochs`` is then -1)."""

from __future__ import annotations

from types import SimpleNamespace

from lightning_methods.callbacks.accuracy_tracker import TestAccuracyTracker


def test_a_max_steps_run_is_evaluated_every_n_epochs_and_at_its_end():
    tracker = TestAccuracyTracker(every_n_epochs=3)
    evaluated = []
    tracker.evaluate = lambda trainer, pl_module: evaluated.append(trainer.current_epoch) or 0.5
    module = SimpleNamespace(log=lambda *args, **kwargs: None)
    for epoch in range(5):  # 10 steps per epoch, max_steps 50: epoch 4 is the last
        trainer = SimpleNamespace(current_epoch=epoch, callback_metrics={}, should_stop=False, max_epochs=-1,
                                  max_steps=50, global_step=10 * (epoch + 1))
        tracker.on_train_epoch_end(trainer, module)
    assert evaluated == [2, 4]
