"""Federated learning: FedFree and the heterogeneous / homogeneous FL baselines of its evaluation.

Paper: Du, Xiang, Cai, Liu, Wu, Huo, Long, "FedFree: Breaking Knowledge-sharing Barriers through Layer-wise
Alignment in Heterogeneous Federated Learning" (NeurIPS 2025; OpenReview G10Y4vrhGF; no arXiv id).

Public classes (one algorithm object per method, shared by the in-process runner and the Flower apps):
:class:`FedFree`, :class:`LocalOnly`, :class:`FedAvg`, :class:`FedProx`, :class:`PerFedAvg`, :class:`PFedLA`,
:class:`FedProto`, :class:`FedGH`, :class:`FedKD`, :class:`FedTGP`, their base :class:`FedAlgorithm` and
:class:`Payload`, and the client LightningModule
:class:`FedClientModule`. Pure server functions: :mod:`.layers` (layer inventory, Eq. 2 critical layers, depth
mapping), :mod:`.distill` (Gaussian pseudo-data layer distillation, Eqs. 3-5), :mod:`.kge` (histogram entropy, KGE,
projection, Eqs. 6-7); partitioners in :mod:`.partition`.

Family parts elsewhere: client families ``fed_*`` in ``lightning_methods/models/fed_clients.py`` (512-d feature +
head), DataModule :class:`lightning_methods.datamodules.FederatedDataModule`, configs ``configs/federated/``, doc
``docs/methods/federated.md``, tests ``tests/federated/``, benchmark ``benchmarks/federated_cases.py``. The runner
(:mod:`.runner`), the command (:mod:`.cli`, ``lightning-methods-fed``) and the Flower apps (:mod:`.flower`, extra
``[federated]``) are imported on demand, not here.
"""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.federated.algorithm": (
            "ClientInfo", "FedAlgorithm", "FederationInfo", "LocalOnly", "Payload",
        ),
        "lightning_methods.federated.baselines": ("FedAvg", "FedProx", "PerFedAvg"),
        "lightning_methods.federated.client": ("FedClientModule",),
        "lightning_methods.federated.fedfree": ("FedFree",),
        "lightning_methods.federated.fedgh": ("FedGH",),
        "lightning_methods.federated.fedkd": ("FedKD",),
        "lightning_methods.federated.fedproto": ("FedProto",),
        "lightning_methods.federated.fedtgp": ("FedTGP",),
        "lightning_methods.federated.pfedla": ("PFedLA",),
    },
)
