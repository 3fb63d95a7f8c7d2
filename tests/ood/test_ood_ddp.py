"""Embedding and scoring through the predict loop on 2 CPU processes (gloo DDP): the padding DistributedSampler
repeats samples, the gathered results hold every sample exactly once, equal to a single-process run."""

from __future__ import annotations

import lightning as L
import torch
from ood_helpers import TINY_RDM, fill_by_name

from lightning_methods.datamodules import load_digits_uint8
from lightning_methods.ood.embedding import embed
from lightning_methods.ood.encoders import EncoderSpec, build_encoder
from lightning_methods.ood.features import EmbeddingSet, FeaturePreprocessor
from lightning_methods.ood.rdm import RDMModule
from lightning_methods.ood.stages import score_sets

from helpers import run_ddp

N = 13  # odd: two ranks get 7 and 7 samples, one repeated


def _work(devices: int) -> dict:
    images = load_digits_uint8()[0][:N]
    index = torch.arange(100, 100 + N).flip(0)  # ids need not be positions or sorted
    encoder, _ = build_encoder(EncoderSpec("e", backbone="resnet8", seed=0), 10)

    def make_trainer(**kw):
        return L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_model_summary=False, **kw)

    feats = embed(encoder, images, torch.zeros(N, dtype=torch.long), index, make_trainer=make_trainer, batch_size=4)
    pre = FeaturePreprocessor("raw", pca_dim=8).fit(feats.features)
    torch.manual_seed(0)
    # a fixed grid: batch-independent scores
    model = RDMModule(dim=8, likelihood={"method": "rk4", "step_size": 0.05}, net=TINY_RDM)
    model.load_state_dict(fill_by_name(model.state_dict()))
    half = EmbeddingSet(feats.features[:5], feats.index[:5], feats.targets[:5])
    scores = score_sets(model, pre, {"all": feats, "half": half}, make_trainer=make_trainer, batch_size=3)
    return {"features": feats.features, "index": feats.index, "scores": scores}


def _worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(rank)  # nothing may depend on the global generator
    return _work(world_size)


def test_embedding_and_scoring_under_ddp_match_single_process(one_thread):
    single = _work(1)
    results = run_ddp(_worker, world_size=2)
    assert single["index"].tolist() == list(range(100, 100 + N))
    for out in results:  # every rank holds the full, deduplicated, sorted result
        assert out["index"].tolist() == single["index"].tolist()
        torch.testing.assert_close(out["features"], single["features"], rtol=1e-5, atol=1e-5)
        for name in ("all", "half"):
            assert out["scores"][name]["index"].tolist() == single["scores"][name]["index"].tolist()
            # same probes per sample (drawn from its index) and a fixed-grid solver: equal up to float rounding
            torch.testing.assert_close(out["scores"][name]["logp"], single["scores"][name]["logp"], rtol=1e-6,
                                       atol=0)
    assert len(single["scores"]["half"]["index"]) == 5
