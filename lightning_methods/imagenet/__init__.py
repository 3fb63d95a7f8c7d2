"""ImageNet-scale data preparation: sorting the ILSVRC2012 validation folder, converting folder trees into litdata's
streaming format, and an offline demo tree of real photographs.

The command ``lightning-methods prepare-data`` (``prepare.py``, imported only when it runs) has three subcommands:
``sort-val``, ``convert`` and ``demo`` (``demo.py``). The DataModules that read the results are in
``lightning_methods.datamodules`` (``ImageNetDataModule``, ``ImageNet200DataModule`` in ``datamodules/imagenet.py``;
``NoisyImageNetDataModule``, ``WebVisionDataModule`` in ``datamodules/imagenet_noisy.py``; the streaming path in
``datamodules/streaming.py``); usage and the multi-node recipe in ``docs/imagenet.md``; tests in ``tests/imagenet/``;
the throughput benchmark in ``benchmarks/imagenet_cases.py``.
"""
