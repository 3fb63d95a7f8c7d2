"""Sparse SAM (SSAM-F / SSAM-D): SAM whose perturbation is restricted by a binary mask.

Mi et al., *Make Sharpness-Aware Minimization Stronger: A Sparsified Perturbation Approach*, NeurIPS 2022,
arXiv 2210.05177 (official code Mi-Peng/Sparse-Sharpness-Aware-Minimization).

``eps = rho * g / (||g|| + xi) * m``: by default (official code) the norm is that of the full, unmasked gradient, so
``||eps|| = rho ||g * m|| / ||g|| < rho``. Masks are ``torch.bool`` tensors in ``optimizer.state[p]["mask"]`` (saved in
checkpoints). They are changed from outside the step: by ``lightning_methods.callbacks.SSAMMaskCallback`` (Fisher
masks every ``update_freq`` epochs; dynamic drop/grow updates scheduled for the next step, which applies them right
after the ascent with the gradients at ``w``), or by hand with :meth:`SSAM.set_masks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_methods.optim.sam import SAM
from lightning_methods.optim.sam_masks import drop_and_grow, fisher_scores, global_topk_mask
from lightning_methods.utils.distributed import all_reduce_flat, broadcast_tensors_, is_distributed

MaskInit = Literal["zeros", "ones", "random"]


Score = Literal["gradient", "weight", "random"]


class SSAM(SAM):
    """Sparse SAM with a global binary perturbation mask.

    Args:
        params, base_optimizer, rho, **kwargs: as for :class:`SAM` (the mask covers its perturbed set).
        sparsity: fraction ``s`` of the entries that are NOT perturbed (0.5 in every official README example).
        mask_init: ``"zeros"`` (SSAM-F: the first step is a plain base step until the first Fisher mask),
            ``"random"`` (SSAM-D: ``d - ceil(d s)`` random live entries) or ``"ones"`` (plain SAM until an update).
        mask_norm: ``"full"`` (official: normalize by the norm of the unmasked gradient) or ``"masked"`` (by the norm
            of the masked gradient, so ``||eps|| = rho``).
        mask_seed: seed of the random initial mask.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[[Iterable[Any]], Optimizer],
        rho: float = 0.1,
        sparsity: float = 0.5,
        mask_init: MaskInit = "zeros",
        mask_norm: Literal["full", "masked"] = "full",
        mask_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1] (fraction of entries NOT perturbed), got {sparsity}")
        if mask_init not in ("zeros", "ones", "random"):
            raise ValueError(f"mask_init must be 'zeros', 'ones' or 'random', got {mask_init!r}")
        if mask_norm not in ("full", "masked"):
            raise ValueError(f"mask_norm must be 'full' or 'masked', got {mask_norm!r}")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.sparsity, self.mask_init, self.mask_norm, self.mask_seed = sparsity, mask_init, mask_norm, mask_seed
        self._pending: dict[str, Any] | None = None
        self.init_masks()

    # ------------------------------------------------------------------------------------------- masks
    def mask_parameters(self) -> list[torch.Tensor]:
        """The tensors the masks cover (the perturbed set), in param-group order."""
        return self.perturbed_parameters()

    def masks(self) -> list[torch.Tensor]:
        return [self.state[q]["mask"] for q in self.mask_parameters()]

    def num_mask_entries(self) -> int:
        return sum(q.numel() for q in self.mask_parameters())

    def mask_density(self) -> float:
        """Fraction of perturbed entries (one host sync)."""
        live = sum(int(m.sum()) for m in self.masks())
        return live / max(1, self.num_mask_entries())

    def init_masks(self) -> None:
        params = self.mask_parameters()
        if self.mask_init == "random":
            d = self.num_mask_entries()
            keep = d - math.ceil(d * self.sparsity)
            order = torch.randperm(d, generator=torch.Generator().manual_seed(self.mask_seed))
            flat = torch.zeros(d, dtype=torch.bool)
            flat[order[:keep]] = True
            masks, start = [], 0
            for q in params:
                masks.append(flat[start : start + q.numel()].view(q.shape))
                start += q.numel()
        else:
            masks = [torch.full(q.shape, self.mask_init == "ones", dtype=torch.bool) for q in params]
        self.set_masks(masks, sync=False)

    def set_masks(self, masks: Sequence[torch.Tensor] | Mapping[torch.Tensor, torch.Tensor], sync: bool = True) -> None:
        """Install boolean masks: a list aligned with :meth:`mask_parameters` or a dict ``{parameter: mask}``. With
        ``sync`` and an initialized process group, rank 0's masks are broadcast (call it on every rank)."""
        params = self.mask_parameters()
        if isinstance(masks, Mapping):
            masks = [masks[q] for q in params]
        if len(masks) != len(params):
            raise ValueError(f"got {len(masks)} masks for {len(params)} perturbed tensors")
        for q, m in zip(params, masks):
            if m.shape != q.shape:
                raise ValueError(f"mask of shape {tuple(m.shape)} for a parameter of shape {tuple(q.shape)}")
            self.state[q]["mask"] = m.detach().to(device=q.device, dtype=torch.bool).clone()
        if sync:
            self.broadcast_masks()

    def set_masks_from_scores(self, scores: Sequence[torch.Tensor] | Mapping[torch.Tensor, torch.Tensor]) -> None:
        """SSAM-F: keep the global top ``int(d (1 - s))`` entries of ``scores`` (e.g. Fisher information); a list
        aligned with :meth:`mask_parameters` or a dict ``{parameter: scores}``."""
        if isinstance(scores, Mapping):
            scores = [scores[q] for q in self.mask_parameters()]
        self.set_masks(global_topk_mask(scores, int(self.num_mask_entries() * (1.0 - self.sparsity))))

    def update_fisher_mask(
        self,
        model: nn.Module,
        samples: Iterable[tuple[torch.Tensor, torch.Tensor]],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """SSAM-F update: empirical Fisher of the perturbed tensors over ``samples`` (single samples, see
        :func:`fisher_scores`), summed over ranks when a process group is initialized (give each rank its share of
        the samples), then the global top-k mask."""
        scores = fisher_scores(model, self.mask_parameters(), samples, loss_fn)
        self.set_masks_from_scores(all_reduce_flat(scores))

    def broadcast_masks(self, src: int = 0) -> None:
        """Make every rank hold rank ``src``'s masks (no-op without an initialized multi-process group)."""
        broadcast_tensors_(self.masks(), src)

    def _mask(self, q: torch.Tensor) -> torch.Tensor | None:
        st = self.state.get(q)
        return None if st is None else st.get("mask")

    def _mask_in_norm(self) -> bool:
        return self.mask_norm == "masked"

    # ------------------------------------------------------------------------------------------- SSAM-D
    def schedule_dynamic_update(
        self, rate: float, drop_score: Score = "gradient", grow_score: Score = "random", seed: int = 0
    ) -> None:
        """Apply one drop/grow update in the next ``step``, after the ascent direction was computed with the
        current mask and with the gradients at ``w`` (the official order: the new mask acts from the step after)."""
        for s in (drop_score, grow_score):
            if s not in ("gradient", "weight", "random"):
                raise ValueError(f"scores must be 'gradient', 'weight' or 'random', got {s!r}")
        self._pending = {"rate": rate, "drop_score": drop_score, "grow_score": grow_score, "seed": seed}

    def dynamic_update(self, rate: float, drop_score: Score = "gradient", grow_score: Score = "random",
                       seed: int = 0) -> None:
        """Drop/grow now. ``"gradient"`` scores read ``p.grad`` (pass-1 gradients), ``"weight"`` scores ``|p|`` as it is
        now (inside a scheduled update of a SAM step: ``|w + eps|`` after the ascent, as in the official code),
        ``"random"`` scores come from a CPU generator seeded with ``seed`` (identical on every rank).

        With ``m_sharpness`` under DDP the pass-1 gradients and the ascent are each rank's own, so the scores are made
        identical on every rank: ``"gradient"`` scores read the rank mean of the gradients (what a step without
        ``m_sharpness`` reads), ``"weight"`` scores are the rank mean of each rank's ``|w + eps|``."""
        params = self.mask_parameters()
        gen = torch.Generator().manual_seed(int(seed))
        per_rank = self.m_sharpness and is_distributed()
        if "gradient" in (drop_score, grow_score) and any(q.grad is None for q in params):
            raise RuntimeError("gradient scores need the pass-1 gradients of every masked parameter")
        grads = [q.grad.detach() for q in params] if "gradient" in (drop_score, grow_score) else []
        if per_rank and grads:
            grads = all_reduce_flat(grads, "mean")

        def scores(kind: str) -> list[torch.Tensor]:
            if kind == "gradient":
                return [g.abs().float() for g in grads]
            if kind == "weight":
                out = [q.detach().abs().float() for q in params]
                return all_reduce_flat(out, "mean") if per_rank else out
            return [torch.rand(q.shape, generator=gen).to(q.device) for q in params]

        drop = scores(drop_score)
        grow = scores(grow_score)
        self.set_masks(drop_and_grow(self.masks(), drop, grow, self.sparsity, rate))

    def _on_pass1_gradients(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.dynamic_update(**pending)

    # ------------------------------------------------------------------------------------------- state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for q in self.mask_parameters():  # torch casts saved state to the parameter dtype: masks back to bool
            st = self.state.get(q)
            if st is None or "mask" not in st:
                raise KeyError("the state dict holds no SSAM mask for some perturbed parameter: it was not saved "
                               "by an SSAM optimizer with the same perturbed set")
            st["mask"] = st["mask"].to(dtype=torch.bool)
