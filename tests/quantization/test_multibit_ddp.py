"""Two CPU ranks (gloo): scores gathered by position give every rank the same subsets (with the running BatchNorm
statistics and with each child's recalibrated ones); the per-rank batches are disjoint shards of each subset;
parameters stay identical (BN buffers are per rank); switchable BN without find_unused_parameters is refused."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from multibit_helpers import TinyImages, tiny_model

from lightning_methods.callbacks import BitwiseCoresetCallback

from helpers import run_ddp


def _worker(rank: int, world_size: int, score_bn: str) -> dict:
    from lightning.pytorch.callbacks import Callback

    seen: list[tuple[int, list[torch.Tensor]]] = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, [c["index"].clone() for c in pl_module.chunks(batch)]))

    torch.manual_seed(0)
    model = tiny_model()
    coreset = BitwiseCoresetCallback(prune_rate=0.5625, refresh_every=1, warmup_full=1,  # 21 of 48
                                     score_bn=score_bn, score_recalib_batches=3)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        reload_dataloaders_every_n_epochs=1, limit_val_batches=1, num_sanity_val_steps=0,
                        callbacks=[coreset, Record()])
    trainer.fit(model, TinyImages(batch_size=4))
    out = {"subsets": coreset.subsets, "scores": coreset.scores, "seen": seen, "order": model.train_order,
           "weights": {k: v.detach().clone() for k, v in model.named_parameters()}, "steps": trainer.global_step,
           "val_acc": float(trainer.callback_metrics["val/acc"]), "total": dict(model.cost.total_samples)}
    if score_bn != "running":
        return out
    switchable = tiny_model(shared_bn=False)
    bad = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", max_steps=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    try:
        bad.fit(switchable, TinyImages(batch_size=4))
    except ValueError as err:
        out["error"] = str(err)
    return out


@pytest.mark.parametrize("score_bn", ["running", "recalibrated"])
def test_two_ranks_hold_identical_subsets_and_disjoint_shards(score_bn, one_thread):
    r0, r1 = run_ddp(_worker, 2, args=(score_bn,))
    for bits in r0["order"]:
        assert torch.equal(r0["subsets"][bits], r1["subsets"][bits]) and len(r0["subsets"][bits]) == 21
        assert torch.equal(r0["scores"][bits], r1["scores"][bits]) and len(r0["scores"][bits]) == 48
    for k in r0["weights"]:
        torch.testing.assert_close(r0["weights"][k], r1["weights"][k], rtol=0, atol=0, msg=k)
    assert r0["steps"] == r1["steps"] == 6 + 3  # 48 / (4 x 2), then ceil(21 / (4 x 2)): nothing dropped
    assert r0["val_acc"] == r1["val_acc"] and r0["total"] == r1["total"]
    # warm-up, coreset epoch, scoring: counted once over both ranks; the calibration batches (3 of 4) on each rank
    assert r0["total"][32] == 48 + 21 + 48 + (2 * 3 * 4 if score_bn == "recalibrated" else 0)
    for k, bits in enumerate(r0["order"]):
        mine = [torch.cat([c[k] for e, c in r["seen"] if e == 1]) for r in (r0, r1)]
        assert not set(mine[0].tolist()) & set(mine[1].tolist())  # disjoint shards
        # every coreset sample exactly once per epoch over both ranks (the last step holds 3 + 2), index == position
        assert sorted(mine[0].tolist() + mine[1].tolist()) == r0["subsets"][bits].tolist()
        assert sorted(len(m) for m in mine) == [10, 11]
    if score_bn == "running":
        assert "ddp_find_unused_parameters_true" in r0["error"] and "ddp_find_unused_parameters_true" in r1["error"]
