"""HPN under DDP (2 CPU processes, gloo): the sum-reduced loss's effective gradient scale per ``sum_scope``, and the
prototype buffer synchronised from rank 0.

One SGD step (lr 0.1, no momentum) on 8 samples: 2 processes with 4 samples each vs 1 process with all 8.
- ``sum_scope="global"``: the same step as one process with the whole batch (sum over the global batch);
- ``sum_scope="device"`` (default): DDP averages the per-device sums, so the update is half of it (1 / world size);
- ``reduction="mean"``: the same step as one process with the whole batch (mean over the global batch).
"""

from __future__ import annotations

import warnings
from functools import partial

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_methods.hpn import HPNClassifier

from helpers import run_ddp

CASES = [("sum", "global"), ("sum", "device"), ("mean", "device")]


def data(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 4, 4, generator=g)
    return [{"image": x[i], "target": torch.tensor(i % 4), "index": torch.tensor(i)} for i in range(n)]


def one_step(reduction: str, sum_scope: str, devices: int, batch_size: int, shift_prototypes: bool = False):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HPNClassifier(backbone=net, num_classes=4, prototype_dims=3, prototype_iterations=30,
                              reduction=reduction, sum_scope=sum_scope, optimizer=partial(torch.optim.SGD, lr=0.1))
    protos0 = model.prototypes.clone()
    if shift_prototypes:  # a rank whose prototypes differ: DDP must broadcast rank 0's
        model.prototypes.add_(0.5)
    strategy = "ddp" if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    w0 = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    trainer.fit(model, DataLoader(data(), batch_size=batch_size, shuffle=False))
    w1 = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"w0": w0, "w1": w1, "prototypes": model.prototypes.clone(), "prototypes0": protos0}


def ddp_worker(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    return {case: one_step(*case, devices=world_size, batch_size=4, shift_prototypes=rank == 1) for case in CASES}


def test_sum_reduced_loss_step_under_ddp(one_thread):
    results = run_ddp(ddp_worker, 2)
    for case in CASES:
        single = one_step(*case, devices=1, batch_size=8)
        r0, r1 = results[0][case], results[1][case]
        torch.testing.assert_close(r0["w1"], r1["w1"], rtol=0, atol=0)  # ranks agree
        torch.testing.assert_close(r0["w0"], single["w0"], rtol=0, atol=0)
        expected = single["w1"] if case != ("sum", "device") else single["w0"] + 0.5 * (single["w1"] - single["w0"])
        torch.testing.assert_close(r0["w1"], expected, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(r0["w1"], r0["w0"])  # a real step was taken
        # rank 1 started with shifted prototypes; DDP broadcast rank 0's when it wrapped the model
        torch.testing.assert_close(r1["prototypes"], r0["prototypes0"], rtol=0, atol=0)
        torch.testing.assert_close(r0["prototypes"], r0["prototypes0"], rtol=0, atol=0)
