"""Optimizers of lightning-methods: ordinary ``torch.optim.Optimizer`` subclasses usable without Lightning.

Conventions (see ARCHITECTURE.md): ``step(closure)`` evaluates the closure itself (under ``torch.enable_grad()``);
complete ``state_dict``/``load_state_dict``; tensors only in ``state``; fp32 math; class attribute
``supports_grad_scaler = False`` where a GradScaler (``16-mixed``) cannot serve the step.
"""

__all__: list[str] = []

from .koala import KOALAM, KOALAV, KOALAPlusPlus  # noqa: E402
from .koala_base import KOALABase, global_loss_moments  # noqa: E402

__all__ += ["KOALABase", "KOALAM", "KOALAPlusPlus", "KOALAV", "global_loss_moments"]

from .sam import SAM, sam_closure  # noqa: E402
from .sam_masks import death_rate, drop_and_grow, drop_grow_counts, fisher_scores, global_topk_mask  # noqa: E402
from .sam_sparse import SSAM  # noqa: E402
from .sam_variants import ASAM, ASAMON, SAMON  # noqa: E402

__all__ += ["SAM", "ASAM", "SAMON", "ASAMON", "SSAM", "sam_closure", "death_rate", "drop_and_grow", "drop_grow_counts",
            "fisher_scores", "global_topk_mask"]

from .deepkd import DeepKD  # noqa: E402

__all__ += ["DeepKD"]


def __getattr__(name: str):  # deprecated location of the KOALA monitor callback (a Lightning callback)
    if name == "KOALAMonitor":
        import warnings

        warnings.warn("lightning_methods.optim.KOALAMonitor moved to lightning_methods.callbacks.KOALAMonitor; the "
                      "old name will be removed in the next release", DeprecationWarning, stacklevel=2)
        from ..callbacks.koala_monitor import KOALAMonitor

        return KOALAMonitor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
