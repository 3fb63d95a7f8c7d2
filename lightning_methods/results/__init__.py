"""Results tools: result files, predictions, grids over seeds and settings, tables, the package catalog.

Not a paper's method: the tooling that turns runs into numbers a researcher can report (issue 11).

- Result files: every ``fit`` / ``validate`` / ``test`` writes ``results.json`` and ``metrics.csv`` into its run
  directory (:class:`lightning_methods.callbacks.ResultsWriter`, schema in :mod:`.record`); ``predict`` writes
  ``predictions.csv`` (:class:`lightning_methods.callbacks.PredictionWriter`, DDP-safe); the CLI wires both
  (:mod:`.cli_hooks`: ``--results.*``, ``--predictions.*``).
- ``lightning-methods grid`` (:mod:`.grid`, pure parts in :mod:`.gridspec`): seeds x ``--set`` combinations, resumable,
  or a W&B sweep / scheduler commands.
- ``lightning-methods table`` (:mod:`.table`, pure parts in :mod:`.aggregate`; W&B input in :mod:`.wandb_source`):
  mean +- std per configuration beside the paper's numbers (``# paper:`` config header lines), learning curves;
  it also reads the results of ``lightning-methods fed`` and ``select`` (:mod:`.multistage`); ``--baseline``: each
  row's difference to a baseline row, beyond the seed spread or not (:mod:`.compare`).
- ``lightning-methods list`` (:mod:`.catalog`): methods, configs, backbones with parameter counts, DataModules.

Docs: ``docs/results.md`` and the README section "Reproducing a paper table". Tests: ``tests/results/``.
The command modules (grid, table, catalog) are not imported here.
"""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.results.aggregate": ("Row", "group_runs", "paper_numbers", "summarize"),
        "lightning_methods.results.record": (
            "FORMAT", "best_and_last", "find_records", "flat_metrics", "read_metrics_csv", "read_record",
            "run_directory",
        ),
    },
)
