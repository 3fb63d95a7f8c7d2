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


def _run(tracker: TestAccuracyTracker, val: dict[int, float], epochs: int, accs: list[float]) -> list[int]:
    """Drive ``epochs`` epochs of a ``max_epochs`` run; ``val[e]`` is the validation metric of epoch ``e`` (absent:
    no validation that epoch); epoch ``e``'s test accuracy is ``accs[e]``. Returns the evaluated epochs."""
    evaluated = []
    tracker.evaluate = lambda trainer, pl_module: evaluated.append(trainer.current_epoch) or accs[trainer.current_epoch]
    module = SimpleNamespace(log=lambda *args, **kwargs: None)
    metrics: dict[str, float] = {}
    for epoch in range(epochs):
        trainer = SimpleNamespace(current_epoch=epoch, callback_metrics=metrics, should_stop=False,
                                  max_epochs=epochs, max_steps=-1, global_step=10 * (epoch + 1), sanity_checking=False)
        if epoch in val:  # Lightning keeps the last logged value in callback_metrics after that
            metrics["val/acc"] = val[epoch]
            tracker.on_validation_epoch_end(trainer, module)
        tracker.on_train_epoch_end(trainer, module)
    return evaluated


def test_the_last_epoch_is_evaluated_and_a_stale_validation_value_is_not_used():
    """A 4-epoch run, every 3 epochs, validated at epochs 0 and 2 only (check_val_every_n_epoch 2) and best at 0:
    evaluated at 0 (first best), 2 (every 3rd epoch) and 3 (the last, although not a multiple of 3). Epoch 3 had no
    validation: its record holds no monitor value (-1), not epoch 2's value left in callback_metrics."""
    tracker = TestAccuracyTracker(every_n_epochs=3)
    assert _run(tracker, {0: 0.9, 2: 0.5}, 4, [0.1, 0.2, 0.3, 0.4]) == [0, 2, 3]
    assert [h["monitor"] for h in tracker.history] == [0.9, 0.5, -1.0]
    assert tracker.summary() == {"acc_last": 0.4, "acc_at_best_val": 0.1, "best_val_epoch": 0.0, "best_val": 0.9,
                                 "acc_max": 0.4}


def test_state_round_trip_restores_the_summary():
    """Everything the summary reports survives ``state_dict`` / ``load_state_dict`` (a resumed run reports the
    test accuracy at the best validation epoch of its first part); ties keep the earlier epoch."""
    tracker = TestAccuracyTracker()
    _run(tracker, {0: 0.5, 1: 0.7, 2: 0.7}, 3, [0.1, 0.2, 0.3])
    assert tracker.best_epoch == 1
    restored = TestAccuracyTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.summary() == tracker.summary() and restored.summary()["acc_at_best_val"] == 0.2
