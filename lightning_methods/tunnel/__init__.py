"""The Tunnel Effect: per-layer linear probes, numerical rank and the tunnel start of any trained backbone.

Masarczyk, Ostaszewski, Imani, Pascanu, Miłoś, Trzciński. *The Tunnel Effect: Building Data Representations in Deep
Neural Networks*. NeurIPS 2023, arXiv 2305.19753. Deep supervised networks split into an extractor (early layers
that build linearly separable representations) and a tunnel (later layers where probe accuracy saturates and the
representations' rank collapses towards the number of classes), which hurts out-of-distribution transfer.

Public classes and functions:

- :class:`ProbeSettings` (``settings.py``) and :class:`TunnelProber` (``probe.py``): one probe of a network: one
  forward pass per split for all layers, all linear probes trained together on the device, numerical ranks, the OOD
  probe;
- :func:`probe_points` (``points.py``): the layers of a backbone in forward order (VGG-19: 19, ResNet-34: 34 =
  33 conv + FC, MLPs: one per linear layer), overridable by module names;
- :func:`tunnel_start`, :func:`elbow`, :func:`ood_retained`, :func:`tunnel_strength` (``detect.py``);
- :class:`TunnelReport` (``report.py``): the per-layer table (CSV, JSON, W&B) and :func:`plot_report` /
  :func:`plot_formation` (``plots.py``, matplotlib);
- data helpers (``data.py``): :func:`datamodule_data`, :func:`class_subset` (the seeded OOD class subset).

Shared pieces: ``lightning_methods.analysis`` (feature hooks, ``numerical_rank``, linear probes), backbones
``mlp*`` / ``vgg*_3fc`` (``models/mlp.py``, ``models/vgg_fc3.py``). Family parts: the callback
``lightning_methods.callbacks.TunnelProbe``, the DataModule ``lightning_methods.datamodules.CINIC10DataModule``,
the command ``lightning-methods probe`` (``tunnel/cli.py``), configs ``configs/tunnel/``, the doc
``docs/methods/tunnel.md``, tests ``tests/tunnel/`` and the benchmark ``benchmarks/tunnel_cases.py``.
"""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.tunnel.data": ("ProbeData", "class_subset", "datamodule_data", "select_classes"),
        "lightning_methods.tunnel.detect": ("elbow", "ood_retained", "tunnel_start", "tunnel_strength"),
        "lightning_methods.tunnel.plots": ("plot_formation", "plot_report"),
        "lightning_methods.tunnel.points": ("probe_points",),
        "lightning_methods.tunnel.probe": ("TunnelProber",),
        "lightning_methods.tunnel.report": ("TunnelReport",),
        "lightning_methods.tunnel.settings": ("ProbeSettings",),
    },
)
