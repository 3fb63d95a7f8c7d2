"""PredictionWriter: `predict` writes one row per sample (index, target, pred, confidence, probabilities) that match
predict_step, also under 2-process DDP with a padding sampler (no duplicated rows)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch

from lightning_methods import ImageClassifier
from lightning_methods.callbacks import PredictionWriter
from lightning_methods.cli import build_cli
from lightning_methods.datamodules import DigitsDataModule, IndexedTensorDataset, collate_dict
from lightning_methods.utils import sharded_loader

from helpers import TinyNet, run_ddp

REPO = Path(__file__).resolve().parents[2]
QUICK = str(REPO / "configs/quickstart.yaml")
N_SAMPLES = 37  # odd: a padding DistributedSampler repeats one sample on the second rank


def read_predictions(path: Path) -> dict[str, np.ndarray]:
    data = np.genfromtxt(path, delimiter=",", names=True)
    return {name: data[name] for name in data.dtype.names}


def expected_predictions(model: ImageClassifier, loader, transfer) -> dict[str, torch.Tensor]:
    """predict_step on every batch, concatenated and sorted by index (computed without the writer)."""
    model.eval()
    outs = []
    with torch.no_grad():
        for i, batch in enumerate(loader):
            outs.append(model.predict_step(transfer(batch), i))
    cat = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    order = torch.argsort(cat["index"])
    return {k: v[order] for k, v in cat.items()}


def test_predict_command_writes_one_row_per_sample_matching_predict_step(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    common = ["--config", QUICK, "--trainer.logger=false", "--trainer.accelerator=cpu",
              "--trainer.enable_progress_bar=false"]
    build_cli(["fit", *common, "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--test_after_fit=off",
               f"--trainer.default_root_dir={tmp_path / 'fit'}"])
    ckpt = tmp_path / "fit/checkpoints/last.ckpt"
    cli = build_cli(["predict", *common, f"--trainer.default_root_dir={tmp_path / 'run'}", f"--ckpt_path={ckpt}",
                     "--predictions.probabilities=true", "--return_predictions=false"])
    model = ImageClassifier.load_from_checkpoint(ckpt)
    # the checkpoint belongs to the fit's run: the predictions go beside it, named after the checkpoint (issue 21)
    rows = read_predictions(tmp_path / "fit/predictions-last.csv")
    assert not (tmp_path / "run").exists()
    data = DigitsDataModule(batch_size=64, seed=0)
    data.setup("predict")
    expected = expected_predictions(model, data.predict_dataloader(), lambda b: data.on_after_batch_transfer(b, 0))
    n = len(data.test_set)
    assert len(rows["index"]) == n and np.array_equal(rows["index"], expected["index"].numpy())
    assert np.array_equal(rows["target"], expected["target"].numpy())
    assert np.array_equal(rows["pred"], expected["pred"].numpy())
    assert np.allclose(rows["confidence"], expected["confidence"].numpy(), rtol=1e-7, atol=0)
    probs = np.stack([rows[f"prob_{c}"] for c in range(10)], axis=1)
    assert np.allclose(probs, expected["probs"].numpy(), rtol=1e-7, atol=1e-12)
    summary = json.loads((tmp_path / "fit/predictions-last.json").read_text())
    assert summary["checkpoint"] == str(ckpt) and summary["files"][0]["rows"] == summary["files"][0]["dataset_size"]
    assert summary["files"][0]["accuracy"] == float(np.mean(rows["pred"] == rows["target"]))
    assert cli.trainer.predict_loop.num_dataloaders == 1


class TinyData(L.LightningDataModule):
    """N_SAMPLES random uint8 images; ``padding_sampler`` shards them with a padding DistributedSampler."""

    def __init__(self, padding_sampler: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (N_SAMPLES, 3, 8, 8), dtype=torch.uint8, generator=g)
        self.dataset = IndexedTensorDataset(images, torch.randint(0, 5, (N_SAMPLES,), generator=g))
        self.padding_sampler = padding_sampler

    def predict_dataloader(self):
        if self.padding_sampler:
            return sharded_loader(self.dataset, batch_size=4, collate_fn=collate_dict)
        return torch.utils.data.DataLoader(self.dataset, batch_size=4, collate_fn=collate_dict)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return {**batch, "image": batch["image"].float() / 255.0}


def tiny_model() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(backbone=TinyNet(5), num_classes=5)


class CountRows(L.Callback):
    """Rows this rank predicted (before any gathering)."""

    def __init__(self) -> None:
        self.rows = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.rows += len(outputs["index"])


def _ddp_predict(rank: int, world_size: int, out: str) -> dict:
    seen = {}
    for padding in (False, True):
        writer, count = PredictionWriter(dirpath=f"{out}/padding{int(padding)}", probabilities=True), CountRows()
        trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            use_distributed_sampler=not padding, callbacks=[writer, count])
        trainer.predict(tiny_model(), TinyData(padding), return_predictions=False)
        seen[padding] = count.rows
    return seen


def test_ddp_predictions_have_one_row_per_sample(tmp_path):
    seen = run_ddp(_ddp_predict, 2, (str(tmp_path),))
    assert seen[0][True] + seen[1][True] == N_SAMPLES + 1  # the padding sampler duplicated one sample
    data = TinyData()
    expected = expected_predictions(tiny_model(), data.predict_dataloader(), lambda b: data.on_after_batch_transfer(b,
                                                                                                                    0))
    for padding in (0, 1):
        rows = read_predictions(tmp_path / f"padding{padding}/predictions.csv")
        assert np.array_equal(rows["index"], np.arange(N_SAMPLES))
        assert np.array_equal(rows["pred"], expected["pred"].numpy())
        probs = np.stack([rows[f"prob_{c}"] for c in range(5)], axis=1)
        assert np.allclose(probs, expected["probs"].numpy(), rtol=1e-6, atol=1e-9)


def test_npz_output_no_files_under_fast_dev_run_and_gather_predictions_dedups(tmp_path, one_thread):
    """``--predictions.filename predictions.npz`` writes arrays (``probs`` N x C) with ``predictions.json`` beside
    them; ``fast_dev_run`` writes no result files (predictions, results.json); GatherPredictions keeps one row per
    index, sorted, of the keys asked for."""
    from lightning_methods.callbacks import GatherPredictions, ResultsWriter
    from lightning_methods.datamodules import collate_dict

    from helpers import quiet_trainer

    writer = PredictionWriter(dirpath=str(tmp_path / "npz"), filename="predictions.npz", probabilities=True)
    quiet_trainer(callbacks=[writer]).predict(tiny_model(), TinyData(), return_predictions=False)
    arrays = np.load(tmp_path / "npz/predictions.npz")
    assert np.array_equal(arrays["index"], np.arange(N_SAMPLES)) and arrays["probs"].shape == (N_SAMPLES, 5)
    summary = json.loads((tmp_path / "npz/predictions.json").read_text())
    assert summary["files"][0]["rows"] == summary["files"][0]["dataset_size"] == N_SAMPLES

    smoke = [PredictionWriter(dirpath=str(tmp_path / "smoke")), ResultsWriter(dirpath=str(tmp_path / "smoke"))]
    quiet_trainer(callbacks=smoke, fast_dev_run=True).predict(tiny_model(), TinyData(), return_predictions=False)
    data = TinyData()
    data.test_dataloader = data.predict_dataloader
    quiet_trainer(callbacks=smoke[1:], fast_dev_run=True).test(tiny_model(), data, verbose=False)
    assert not (tmp_path / "smoke").exists()

    class Repeats(TinyData):  # samples 3, 0 and 5 twice, as padding would repeat them
        def predict_dataloader(self):
            repeated = torch.utils.data.Subset(self.dataset, [3, 0, 5])
            return torch.utils.data.DataLoader(torch.utils.data.ConcatDataset([self.dataset, repeated]), batch_size=4,
                                               collate_fn=collate_dict)

    gather = GatherPredictions(keys=["pred"])
    quiet_trainer(callbacks=[gather]).predict(tiny_model(), Repeats(), return_predictions=False)
    (result,) = gather.results.values()
    assert sorted(result) == ["index", "pred"] and torch.equal(result["index"], torch.arange(N_SAMPLES))
