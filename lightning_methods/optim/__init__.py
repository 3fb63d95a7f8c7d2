"""Optimizers of lightning-methods: ordinary ``torch.optim.Optimizer`` subclasses usable without Lightning.

Conventions (see ARCHITECTURE.md): ``step(closure)`` evaluates the closure itself (under ``torch.enable_grad()``);
complete ``state_dict``/``load_state_dict``; tensors only in ``state``; fp32 math; class attribute
``supports_grad_scaler = False`` where a GradScaler (``16-mixed``) cannot serve the step.
"""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.optim.koala": ("KOALAM", "KOALAV", "KOALAPlusPlus"),
        "lightning_methods.optim.koala_base": ("KOALABase", "global_loss_moments"),
        "lightning_methods.optim.sam": ("SAM", "sam_closure"),
        "lightning_methods.optim.sam_masks": (
            "death_rate", "drop_and_grow", "drop_grow_counts", "fisher_scores", "global_topk_mask",
        ),
        "lightning_methods.optim.sam_sparse": ("SSAM",),
        "lightning_methods.optim.sam_variants": ("ASAM", "ASAMON", "SAMON"),
        "lightning_methods.optim.deepkd": ("DeepKD",),
    },
)
