"""PredictionWriter: `predict` writes one row per sample (index, target, pred, confidence, probabilities) that match
predict_step, also under 2-process DDP with a padding sampler (no duplicated rows)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
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


def tiny_expected() -> dict[str, torch.Tensor]:
    """:func:`expected_predictions` of ``tiny_model()`` on ``TinyData``, in one process."""
    data = TinyData()
    return expected_predictions(tiny_model(), data.predict_dataloader(), lambda b: data.on_after_batch_transfer(b, 0))


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
    expected = tiny_expected()
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


class RankSampler(torch.utils.data.Sampler):
    """Positions ``shards[rank]`` of the dataset on this rank (a shard may be empty)."""

    def __init__(self, shards: list[list[int]]) -> None:
        self.shards = shards

    def _mine(self) -> list[int]:
        return self.shards[torch.distributed.get_rank()]

    def __iter__(self):
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())


class UnevenData(TinyData):
    """Two predict dataloaders over the same N_SAMPLES images: in the first, rank 0 gets every sample and rank 1
    none; in the second the ranks share the samples, rank 1 repeating sample 0 as a padding sampler would (so rank 1
    reaches the end of the predict epoch)."""

    def __init__(self) -> None:
        super().__init__()
        self.allow_zero_length_dataloader_with_multiple_devices = True  # else Lightning refuses rank 1's empty loader

    def predict_dataloader(self):
        half = N_SAMPLES // 2
        shards = ([list(range(N_SAMPLES)), []], [list(range(half)), [*range(half, N_SAMPLES), 0]])
        return [torch.utils.data.DataLoader(self.dataset, batch_size=4, sampler=RankSampler(list(s)),
                                            collate_fn=collate_dict) for s in shards]


def _ddp_gather_uneven(rank: int, world_size: int) -> dict:
    from lightning_methods.callbacks import GatherPredictions

    gather, count = GatherPredictions(keys=["pred", "probs"]), CountRows()
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[gather, count])
    trainer.predict(tiny_model(), UnevenData(), return_predictions=False)
    return {"rows": count.rows, "results": gather.results}


def test_gather_predictions_takes_an_empty_shard_from_a_rank_without_a_batch(tmp_path):
    """A rank that got no batch of a predict dataloader contributes an empty shard instead of raising (before, rank 1
    raised "yielded no batch" and rank 0 waited in the gather): with 2 gloo processes where rank 1 gets nothing of
    the first dataloader, every rank holds every sample of each dataloader exactly once, sorted by index, with the
    values single-process predict_step gives (probabilities computed the same way in float32 on the same CPU; 1e-6
    relative leaves room for a different batch composition in the matmul)."""
    out = run_ddp(_ddp_gather_uneven, 2)
    assert out[0]["rows"] == N_SAMPLES + N_SAMPLES // 2 and out[1]["rows"] == N_SAMPLES - N_SAMPLES // 2 + 1
    expected = tiny_expected()
    for rank in (0, 1):
        results = out[rank]["results"]
        assert sorted(results) == [0, 1]
        for idx in (0, 1):
            got = results[idx]
            assert sorted(got) == ["index", "pred", "probs"]
            assert torch.equal(got["index"], torch.arange(N_SAMPLES))  # every sample once, sorted
            assert torch.equal(got["pred"], expected["pred"])
            assert got["probs"].shape == (N_SAMPLES, 5) and got["probs"].dtype == expected["probs"].dtype
            torch.testing.assert_close(got["probs"], expected["probs"], rtol=1e-6, atol=1e-9)


def test_gather_predictions_forgets_the_batches_of_an_interrupted_predict(one_thread):
    """A predict that raised half way leaves no rows behind: the next predict with the same GatherPredictions holds
    only its own rows (dedup keeps the first row of an index, so stale rows of the other model would win)."""
    from lightning_methods.callbacks import GatherPredictions

    from helpers import quiet_trainer

    class Fails(ImageClassifier):
        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 2:
                raise RuntimeError("simulated failure")
            return super().predict_step(batch, batch_idx, dataloader_idx)

    gather = GatherPredictions(keys=["probs"])
    torch.manual_seed(1)
    with pytest.raises(RuntimeError, match="simulated failure"):
        quiet_trainer(callbacks=[gather]).predict(Fails(backbone=TinyNet(5), num_classes=5), TinyData(),
                                                  return_predictions=False)
    quiet_trainer(callbacks=[gather]).predict(tiny_model(), TinyData(), return_predictions=False)
    expected = tiny_expected()
    assert torch.equal(gather.results[0]["index"], torch.arange(N_SAMPLES))
    assert torch.equal(gather.results[0]["probs"], expected["probs"])  # same float32 ops, same batches: bit for bit


def _ddp_write_uneven(rank: int, world_size: int, out: str) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[PredictionWriter(dirpath=out)])
    trainer.predict(tiny_model(), UnevenData(), return_predictions=False)


def test_prediction_writer_takes_an_empty_shard_from_a_rank_without_a_batch(tmp_path):
    """The same for the files of ``predict``: rank 1 has no batch of the first dataloader and contributes an empty
    shard (before, it raised "yielded no batch" while rank 0 waited in the gather); each file holds every sample
    once, sorted, with single-process predictions."""
    run_ddp(_ddp_write_uneven, 2, (str(tmp_path),))
    expected = tiny_expected()
    for idx in (0, 1):
        rows = read_predictions(tmp_path / f"predictions_{idx}.csv")
        assert np.array_equal(rows["index"], np.arange(N_SAMPLES))
        assert np.array_equal(rows["pred"], expected["pred"].numpy())
    summary = json.loads((tmp_path / "predictions.json").read_text())
    assert [f["rows"] for f in summary["files"]] == [N_SAMPLES, N_SAMPLES]
