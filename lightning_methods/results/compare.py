"""Configurations against a baseline over seeds: is a difference beyond the seed spread?

``lightning-methods table RUNS --baseline NAME`` adds, for every other row and tabulated metric, the difference of
the means (row - baseline, display units) and whether the two sets of runs are *apart*: every run of the row above
every run of the baseline, or every one below. Apart is what "beyond the seed spread" means here; without a real
difference, ``n`` and ``m`` runs are apart by the seed alone with probability ``2 / C(n + m, n)`` (any of the
``C(n + m, n)`` orderings of the runs is as likely; two of them are apart), the two-sided exact chance of the most
extreme rank-sum (Mann-Whitney) outcome: 0.1 for 3 runs against 3, 0.008 for 5 against 5. Ties are not apart. With
one run on each side the chance is 1: one run each cannot show an effect.

``--paired`` compares each run with the baseline's run of the same seed instead: for configurations that share
what the seed decides (data split, partition, initialisation; e.g. the algorithms of one ``fed`` config, or a grid's
``--set`` values of one config) the question is then whether the difference has one sign in every seed, by chance
alone ``2 / 2**n`` for ``n`` seeds (0.0625 for 5), more sensitive than *apart* when the seeds move both rows together.

``--baseline_metric M`` compares every metric of the rows with the baseline's ``M`` (e.g. Early Cutting's
``test_acc_last`` against plain training's ``test/acc``). :func:`paired_comparison` compares two metrics of the same
runs (e.g. two detectors of one OOD report): there the question is whether the difference has the same sign in every
run, which happens by chance alone with probability ``2 / 2**n`` (each run's two values equally likely either way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_methods.results.aggregate import Row, row_values, run_seed, run_value


@dataclass(frozen=True)
class Comparison:
    """``values`` (one per run of ``row``, metric ``metric``) against ``baseline_values`` (runs of ``baseline``,
    metric ``baseline_metric``), in display units."""

    row: str
    metric: str
    baseline: str
    baseline_metric: str
    values: tuple[float, ...]
    baseline_values: tuple[float, ...]
    paired: bool = False  # values[i] and baseline_values[i] come from the same run

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / len(self.values)

    @property
    def baseline_mean(self) -> float:
        return math.fsum(self.baseline_values) / len(self.baseline_values)

    @property
    def diff(self) -> float:
        """Mean of the row minus mean of the baseline."""
        return self.mean - self.baseline_mean

    @property
    def apart(self) -> int:
        """+1: every value above every baseline value (paired: above its own run's); -1: every one below; 0: neither
        (the ranges overlap or touch)."""
        if self.paired:
            signs = {(a > b) - (a < b) for a, b in zip(self.values, self.baseline_values, strict=True)}
            return signs.pop() if len(signs) == 1 and 0 not in signs else 0
        if min(self.values) > max(self.baseline_values):
            return 1
        if max(self.values) < min(self.baseline_values):
            return -1
        return 0

    @property
    def chance(self) -> float:
        """Probability of being apart (either way) by the seed alone: ``2 / C(n + m, n)`` (paired: ``2 / 2**n``), at
        most 1."""
        if self.paired:
            return min(1.0, 2.0 / 2 ** len(self.values))
        return min(1.0, 2.0 / math.comb(len(self.values) + len(self.baseline_values), len(self.values)))

    @property
    def verdict(self) -> str:
        if self.chance >= 1:  # one run on each side (or one pair): every order is as likely as this one
            return "one run on each side: no verdict (by chance alone: 1)"
        if self.apart == 0:
            why = "the difference does not have one sign in every run" if self.paired else "the runs' ranges overlap"
            return f"within the seed spread ({why})"
        side = "above" if self.apart > 0 else "below"
        where = f"{side} in every run" if self.paired else f"every run {side} every baseline run"
        return f"{where} (by chance alone: {self.chance:.2g})"


def find_row(rows: Sequence[Row], name: str) -> Row:
    """The row called ``name`` (its ``Config`` cell), or the only row whose name contains ``name``.

    Raises:
        ValueError: no row, or several rows, match (the message lists the rows' names).
    """
    exact = [row for row in rows if row.name == name]
    matches = exact or [row for row in rows if name in row.name]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(repr(row.name) for row in rows)
    what = "several rows contain" if matches else "no row is called or contains"
    raise ValueError(f"--baseline {name!r}: {what} {name!r}; the rows are {names}")


def compare_rows(rows: Sequence[Row], baseline: Row, metrics: Sequence[str],
                 baseline_metric: str | None = None, paired: bool = False) -> list[Comparison]:
    """Every other row against ``baseline``, per metric (against ``baseline_metric`` when given); runs without a
    finite value are left out. ``paired``: each run against the baseline's run of the same seed (seeds that only one
    side has are left out).

    Raises:
        ValueError: ``paired`` and a row holds two runs of one seed (the pairs would be ambiguous).
    """
    out = []
    if paired:
        base_runs = _runs_by_seed(baseline)
    for row in rows:
        if row is baseline:
            continue
        runs = _runs_by_seed(row) if paired else {}
        for metric in metrics:
            base_metric = baseline_metric or metric
            if paired:
                pairs = [(run_value(runs[s], metric), run_value(base_runs[s], base_metric)) for s in runs
                         if s in base_runs]
                found = _paired(row.name, metric, baseline.name, base_metric, pairs)
                out += [found] if found else []
                continue
            values, base = _finite(row_values(row, metric)), _finite(row_values(baseline, base_metric))
            if values and base:
                out.append(Comparison(row.name, metric, baseline.name, base_metric, values, base))
    return out


def _runs_by_seed(row: Row) -> dict[str, dict]:
    by_seed: dict[str, dict] = {}
    for run in row.runs:
        seed = run_seed(run)
        if seed is None:
            raise ValueError(f"--paired: a run of {row.name} records no seed, so it pairs with no baseline run "
                             f"({run.get('run_dir') or run.get('run_id') or 'no run directory'})")
        seed = str(seed)  # the same seed whether a record holds it as a number or as text
        if seed in by_seed:
            raise ValueError(f"--paired: {row.name} holds two runs of seed {seed}; pair runs by seed only where each "
                             "row has one run per seed (leave --paired out to compare the rows' ranges)")
        by_seed[seed] = run
    return by_seed


def _paired(row: str, metric: str, baseline: str, baseline_metric: str,
            pairs: Sequence[tuple[float | None, float | None]]) -> Comparison | None:
    """A paired comparison of the ``(value, baseline value)`` pairs where both are finite; ``None`` when none is."""
    kept = [(a, b) for a, b in pairs if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if not kept:
        return None
    return Comparison(row, metric, baseline, baseline_metric, tuple(a for a, _ in kept), tuple(b for _, b in kept),
                      paired=True)


def paired_comparison(row: Row, metric: str, baseline_metric: str) -> Comparison | None:
    """``metric`` against ``baseline_metric`` run by run over the runs of one row (runs lacking a finite value of
    either are left out); ``None`` when no run has both."""
    return _paired(row.name, metric, row.name, baseline_metric,
                   [(run_value(r, metric), run_value(r, baseline_metric)) for r in row.runs])


def markdown(comparisons: Sequence[Comparison], digits: int = 2) -> str:
    """The comparisons as a Markdown table with a one-line legend."""
    if not comparisons:
        return ""
    first = comparisons[0]
    apart = ("the difference to the same run's (or seed's) baseline value has one sign in every run, with the "
             "chance 2 / 2^n of that" if first.paired else
             "every run of the row above (or below) every run of the baseline, with the chance 2 / C(n + m, n) of that")
    lines = [f"Against `{first.baseline}`: Δ = mean - the baseline's mean; apart = {apart} when nothing differs.", "",
             "| Config | metric | Δ | runs | verdict |", "|---|---|---|---|---|"]
    for c in comparisons:
        metric = c.metric if c.metric == c.baseline_metric else f"{c.metric} vs {c.baseline_metric}"
        lines.append(f"| `{c.row}` | {metric} | {c.diff:+.{digits}f} | {len(c.values)} vs {len(c.baseline_values)} "
                     f"| {c.verdict} |")
    return "\n".join(lines) + "\n"


CSV_HEADER = ("config", "metric", "baseline", "baseline_metric", "n", "baseline_n", "mean", "baseline_mean", "diff",
              "min", "max", "baseline_min", "baseline_max", "apart", "chance", "paired")


def csv_rows(comparisons: Sequence[Comparison]) -> list[list[object]]:
    """Rows under :data:`CSV_HEADER` (``apart``: 1, -1 or 0; ``paired``: 1 when runs were compared pairwise)."""
    rows = []
    for c in comparisons:
        rows.append([c.row, c.metric, c.baseline, c.baseline_metric, len(c.values), len(c.baseline_values),
                     *(f"{v:.6g}" for v in (c.mean, c.baseline_mean, c.diff, min(c.values), max(c.values),
                                            min(c.baseline_values), max(c.baseline_values))),
                     c.apart, f"{c.chance:.6g}", int(c.paired)])
    return rows


def _finite(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(v for v in values if math.isfinite(v))
