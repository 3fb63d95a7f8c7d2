"""The Early Cutting recalibration with a trained model: score the earliest-learned samples, cut the MEEs.

Yuan et al., "Enhancing Sample Selection Against Label Noise by Cutting Mislabeled Easy Examples" (arXiv 2502.08227).
The later model state (the best noisy-validation checkpoint of round 0) evaluates, without augmentation and with
BatchNorm in eval mode, the first ``1 / cutting_rate`` of the ordered selection: cross-entropy against the noisy label
and confidence for all of them, the input-gradient norm (w.r.t. the normalized image) only for the loss candidates.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_methods.callbacks.prediction_history import prepare_images
from lightning_methods.noisy_labels.config import SelectionConfig
from lightning_methods.noisy_labels.selection import (
    CutResult,
    apply_cut,
    cut_subset,
    input_gradient_norms,
    loss_and_confidence,
    loss_candidates,
    mee_from_candidates,
)

EMPTY = torch.empty(0, dtype=torch.long)


@torch.no_grad()
def compute_early_cut(model: torch.nn.Module, datamodule: Any, fkl: torch.Tensor, cfg: SelectionConfig,
                      device: torch.device | str = "cpu") -> tuple[CutResult, dict[str, torch.Tensor]]:
    """Score the earliest-learned part of ``fkl`` with ``model`` (the later state, in eval mode, eval transform) and
    cut the Mislabeled Easy Examples. Returns the result and the scores (for saving)."""
    model = model.to(device).eval()
    ds = datamodule.train_set
    subset = cut_subset(fkl, cfg.cutting_rate)
    pos = torch.searchsorted(ds.indices, subset)
    if not torch.equal(ds.indices[pos], subset):
        raise RuntimeError("the selection holds indices outside the DataModule's training set")
    bs = cfg.score_batch_size

    def batch(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = {"image": ds.images[p].to(device), "target": ds.targets[p].to(device)}
        return prepare_images(b, datamodule, augment=False), b["target"]

    losses, confs = [], []
    for s in range(0, len(pos), bs):
        loss, conf = loss_and_confidence(model, *batch(pos[s : s + bs]))
        losses.append(loss.cpu())
        confs.append(conf.cpu())
    loss = torch.cat(losses) if losses else torch.empty(0)
    conf = torch.cat(confs) if confs else torch.empty(0)
    cand = loss_candidates(subset, loss, cfg.loss_select, cfg.num_candidates, cfg.loss_quantile)
    order = {int(i): j for j, i in enumerate(subset.tolist())}
    cand_in_subset = torch.tensor([order[int(i)] for i in cand.tolist()], dtype=torch.long)
    cand_pos = pos[cand_in_subset] if len(cand) else EMPTY
    grads = [input_gradient_norms(model, *batch(cand_pos[s : s + bs])).cpu() for s in range(0, len(cand_pos), bs)]
    grad = torch.cat(grads) if grads else torch.empty(0)
    mee = mee_from_candidates(cand, conf[cand_in_subset], grad, cfg.conf_quantile, cfg.grad_quantile)
    scores = {"subset": subset, "loss": loss, "confidence": conf, "candidates": cand, "candidate_grad_norm": grad,
              "mee": mee}
    return apply_cut(fkl, mee, subset, cand), scores
