"""A run saved mid-training (after epoch 1) and resumed from its last.ckpt takes exactly the steps of the
uninterrupted run:
weights, momentum buffers, scheduler, data order and augmentation draws all survive the checkpoint."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_methods import ImageClassifier
from lightning_methods.datamodules import DigitsDataModule

from helpers import TinyNet, quiet_trainer, run_ddp


def _model() -> ImageClassifier:
    L.seed_everything(0)
    return ImageClassifier(
        TinyNet(10), 10,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
    )


_trainer = quiet_trainer


@pytest.mark.parametrize(("gpu_resident", "num_workers"), [(False, 0), (True, 0), (False, 1)],
                         ids=["workers0", "gpu_resident", "workers1"])
def test_resume_takes_the_same_next_step(tmp_path, gpu_resident, num_workers):
    """With a worker too: Lightning creates the resumed fit's loader iterator, whose worker prefetches indices at
    once, before it calls ``set_epoch``, so the sampler has to start in the restored epoch by itself (it replayed
    epoch 0's order before)."""
    def dm():
        return DigitsDataModule(batch_size=128, augment="crop", gpu_resident=gpu_resident, seed=3,
                                num_workers=num_workers)

    steps_per_epoch = 1259 // 128  # train split of the digits, drop_last
    full = _model()
    _trainer(max_epochs=2).fit(full, dm())

    # interrupted run: stops after one epoch; its last.ckpt is what `--ckpt_path last` resumes from
    _trainer(max_epochs=1, enable_checkpointing=True,
             callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(_model(), dm())
    ckpt = tmp_path / "last.ckpt"

    resumed = _model()
    torch.manual_seed(1234)  # the global RNG differs after a restart: nothing may depend on it
    # max_epochs, as the configs use (Lightning treats max_steps runs as restarting mid-epoch even from an
    # end-of-epoch checkpoint and replays one extra batch)
    t2 = _trainer(max_epochs=2)
    t2.fit(resumed, dm(), ckpt_path=ckpt)
    assert t2.global_step == 2 * steps_per_epoch
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    assert torch.allclose(full.backbone.bn.running_mean, resumed.backbone.bn.running_mean, atol=1e-6)
    lr_full = t2.optimizers[0].param_groups[0]["lr"]
    assert lr_full == pytest.approx(0.05 * (1 + torch.cos(torch.tensor(torch.pi * 2 / 4)).item()) / 2)


def test_checkpoints_of_python_made_modules_load_with_weights_only(tmp_path):
    """Optimizer factories given from Python (functools.partial, nested for wrapped optimizers) are stored as
    {"class_path", "init_args"} dicts: torch >= 2.6's weights_only loading accepts the file, resuming works, and
    load_from_checkpoint rebuilds equivalent factories."""
    from functools import partial

    from lightning_methods.hparams import callable_from_config, describe_callable

    nested = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    wrapped = partial(dict, base_optimizer=nested, rho=0.5)  # shape of a SAM factory: a factory inside a factory
    cfg = describe_callable(wrapped)
    assert cfg == {"class_path": "builtins.dict", "init_args": {
        "base_optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.9}},
        "rho": 0.5}}
    rebuilt = callable_from_config(cfg)
    assert rebuilt.keywords["base_optimizer"].func is torch.optim.SGD and rebuilt.keywords["rho"] == 0.5

    def model():
        L.seed_everything(0)
        return ImageClassifier("resnet8", 10, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
                               lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=3))

    def dm():
        return DigitsDataModule(batch_size=64)

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(max_epochs=1, limit_train_batches=2, enable_checkpointing=True, callbacks=[ckpt_cb]).fit(model(), dm())
    torch.load(tmp_path / "last.ckpt", weights_only=True)  # raises on pickled callables
    t = _trainer(max_epochs=2, limit_train_batches=2)
    t.fit(model(), dm(), ckpt_path=tmp_path / "last.ckpt")
    assert t.global_step == 4
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "last.ckpt")
    opt = restored.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.05 and opt.defaults["momentum"] == 0.9



@pytest.mark.parametrize("path", ["__main__.NotebookSGD", "no_such_module.Opt", "torch.optim.sgd.f.<locals>.Opt"])
def test_an_unimportable_recorded_callable_is_named_with_the_way_out(path):
    """A checkpoint records an optimizer class defined in a notebook, a script (``__main__``) or a function by that
    path, which another process cannot import: loading names the argument, the path and how to load anyway."""
    from lightning_methods.hparams import callable_from_config

    recorded = {"class_path": path, "init_args": {"lr": 0.1}}
    with pytest.raises(ImportError, match=r"(?s)model argument optimizer: .*" + path.split(".")[-1] +
                       r".*load_from_checkpoint\(path, optimizer=\.\.\.\)"):
        ImageClassifier(TinyNet(10), 10, optimizer=recorded)
    with pytest.raises(ImportError, match="lr_scheduler"):
        ImageClassifier(TinyNet(10), 10, lr_scheduler=recorded)
    assert callable_from_config({"class_path": "torch.optim.SGD", "init_args": {}}).func is torch.optim.SGD


def test_a_callable_recorded_as_text_is_named_when_the_optimizer_is_built():
    """A factory the checkpoint cannot name by import path (a partial with positional arguments, a callable object)
    is recorded as its repr: the loaded module still evaluates, and building its optimizer says what happened."""
    recorded = "functools.partial(<function sgd at 0x7f0000000000>, 0.1)"
    model = ImageClassifier(TinyNet(10), 10, optimizer=recorded)  # loads: evaluation needs no optimizer
    with pytest.raises(ValueError, match=r"(?s)model argument optimizer is 'functools.partial.*"
                                         r"load_from_checkpoint\(path, optimizer=\.\.\.\)"):
        model.configure_optimizers()
    model = ImageClassifier(TinyNet(10), 10, lr_scheduler="<mymodule.Schedule object at 0x7f0000000000>")
    with pytest.raises(ValueError, match="model argument lr_scheduler"):
        model.configure_optimizers()

class _Indices(L.Callback):
    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(batch["index"].tolist())


def _ddp_resume_job(rank: int, world_size: int, ckpt_dir: str) -> dict:
    """One rank of three 2-process DDP fits with a DataLoader worker each: 2 epochs; 1 epoch and its last.ckpt; the
    fit resumed from it. Returns the sample indices of each fit's training batches on this rank."""
    def fit(max_epochs: int, ckpt_path: str | None = None, checkpoint: ModelCheckpoint | None = None) -> list:
        record = _Indices()
        callbacks = [record, *([checkpoint] if checkpoint else [])]
        trainer = _trainer(max_epochs=max_epochs, strategy="ddp", devices=world_size,
                           enable_checkpointing=bool(checkpoint), callbacks=callbacks)
        trainer.fit(_model(), DigitsDataModule(batch_size=128, augment="crop", seed=3, num_workers=1),
                    ckpt_path=ckpt_path)
        return record.seen

    full = fit(2)
    first = fit(1, checkpoint=ModelCheckpoint(dirpath=ckpt_dir, save_last=True))
    torch.distributed.barrier()  # rank 0 has written last.ckpt before any rank reads it
    rest = fit(2, ckpt_path=os.path.join(ckpt_dir, "last.ckpt"))
    return {"full": full, "first": first, "rest": rest}


def test_two_ranks_with_workers_resume_with_the_next_epochs_shards(tmp_path):
    """DDP (2 processes, gloo), one worker per rank: the fit resumed from the end-of-epoch checkpoint takes on each
    rank the batches of the uninterrupted run's second epoch (both ranks start the sampler in the restored epoch, and
    Lightning's sampler wrapper shards that order), and the ranks share each epoch's samples without overlap."""
    ranks = run_ddp(_ddp_resume_job, 2, (str(tmp_path),))
    per_epoch = (1259 // 2) // 128  # each rank's shard of the digits' training split, batches of 128, drop_last
    for rank, job in enumerate(ranks):
        assert len(job["full"]) == 2 * per_epoch and job["first"] == job["full"][:per_epoch], rank
        assert job["rest"] == job["full"][per_epoch:] and job["rest"] != job["first"], rank
    for epoch in range(2):
        shards = [{i for batch in job["full"][epoch * per_epoch:(epoch + 1) * per_epoch] for i in batch}
                  for job in ranks]
        assert not shards[0] & shards[1]
