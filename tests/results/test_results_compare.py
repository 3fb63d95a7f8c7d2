"""`lightning-methods table --baseline`: the difference to a baseline row and whether it is beyond the seed spread
(every run of one side above every run of the other), with the chance of that under no difference checked against
an enumeration of every ordering of the runs."""

from __future__ import annotations

import csv
import itertools
import math
import statistics

import pytest
from results_testing import RHO_ACC, write_rho_grid, write_run

from lightning_methods.results import compare
from lightning_methods.results.aggregate import Row
from lightning_methods.results.table import main as table_main


def test_apart_diff_and_chance_by_hand():
    below = compare.Comparison("a", "m", "b", "m", (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert (below.diff, below.apart, below.chance) == (-3.0, -1, 0.1)  # 2 / C(6, 3) = 2 / 20
    assert below.verdict == "every run below every baseline run (by chance alone: 0.1)"
    touching = compare.Comparison("a", "m", "b", "m", (3.0, 4.0, 5.0), (1.0, 2.0, 3.0))
    assert touching.apart == 0 and "within the seed spread" in touching.verdict  # a tie is not apart
    one_each = compare.Comparison("a", "m", "b", "m", (2.0,), (1.0,))
    assert one_each.chance == 1.0 and one_each.apart == 1  # one run each shows nothing, and the verdict says so
    assert one_each.verdict == "one run on each side: no verdict (by chance alone: 1)"
    one_pair = compare.Comparison("a", "m", "b", "m", (2.0,), (1.0,), paired=True)
    assert one_pair.chance == 1.0 and one_pair.verdict == one_each.verdict
    assert compare.Comparison("a", "m", "b", "m", (6.0,) * 5, (1.0,) * 5).chance == pytest.approx(2 / 252)


@pytest.mark.parametrize(("n", "m"), [(1, 1), (1, 3), (2, 2), (3, 3), (2, 4), (3, 4)])
def test_chance_of_apart_equals_the_share_of_orderings_that_are_apart(n, m):
    """Under no difference every assignment of n + m distinct values to the two sides is equally likely."""
    values = [float(v) for v in range(n + m)]
    apart = total = 0
    for left in itertools.combinations(range(n + m), n):
        right = [i for i in range(n + m) if i not in left]
        c = compare.Comparison("a", "x", "b", "x", tuple(values[i] for i in left), tuple(values[i] for i in right))
        apart += c.apart != 0
        total += 1
    assert total == math.comb(n + m, n)
    assert compare.Comparison("a", "x", "b", "x", (0.0,) * n, (0.0,) * m).chance == pytest.approx(apart / total)


def test_paired_comparison_asks_for_one_sign_in_every_run():
    runs = [{"metrics": {"ood/A/auroc": a, "ood/B/auroc": b}} for a, b in [(90, 80), (70, 60), (95, 94)]]  # x 100
    row = Row("demo", "", runs)
    c = compare.paired_comparison(row, "ood/A/auroc", "ood/B/auroc")
    assert c.paired and c.values == pytest.approx((90, 70, 95)) and c.baseline_values == pytest.approx((80, 60, 94))
    assert c.apart == 1 and c.chance == 0.25  # 2 / 2**3; unpaired the ranges (70..95, 60..94) would overlap
    assert c.diff == pytest.approx(7.0) and c.verdict == "above in every run (by chance alone: 0.25)"
    runs[1]["metrics"]["ood/A/auroc"] = 50  # one run the other way round
    assert compare.paired_comparison(Row("demo", "", runs), "ood/A/auroc", "ood/B/auroc").apart == 0
    runs.append({"metrics": {"ood/A/auroc": 99}})  # a run without the baseline metric is left out
    assert len(compare.paired_comparison(Row("demo", "", runs), "ood/A/auroc", "ood/B/auroc").values) == 3
    assert compare.paired_comparison(row, "ood/A/auroc", "ood/C/auroc") is None


def test_table_with_a_baseline_writes_the_verdicts(tmp_path, capsys):
    cfg = tmp_path / "cifar100_wrn28_10_samon.yaml"
    cfg.write_text("seed_everything: 0\n")
    runs = tmp_path / "runs"
    write_rho_grid(runs, cfg)
    out = tmp_path / "out"
    table = table_main([str(runs), "--metrics", "test/acc", "test/loss", "--baseline", "rho=0.5", "--no_plot",
                        "--output", str(out)])
    by_metric = {c.metric: c for c in table.comparisons}
    assert set(by_metric) == {"test/acc", "test/loss"}
    acc = by_metric["test/acc"]
    assert acc.row == "cifar100_wrn28_10_samon rho=1.0" and acc.baseline == "cifar100_wrn28_10_samon rho=0.5"
    expected = 100 * (math.fsum(RHO_ACC[1.0]) / 4 - math.fsum(RHO_ACC[0.5]) / 3)
    assert acc.diff == pytest.approx(expected, rel=1e-12)
    assert acc.apart == 1 and acc.chance == pytest.approx(2 / 35)  # 77.69 > 77.45: 4 runs against 3
    assert by_metric["test/loss"].apart == -1  # the loss is 1 - acc here
    printed = capsys.readouterr().out
    assert "Against `cifar100_wrn28_10_samon rho=0.5`" in printed
    assert f"| test/acc | {expected:+.2f} | 4 vs 3 | every run above every baseline run (by chance alone: 0.057) |" \
        in printed
    assert (out / "table.md").read_text() == table.markdown
    with open(out / "baseline.csv") as f:
        saved = {r["metric"]: r for r in csv.DictReader(f)}
    assert saved["test/acc"]["apart"] == "1" and float(saved["test/acc"]["diff"]) == pytest.approx(expected, rel=1e-5)
    assert saved["test/acc"]["paired"] == "0"
    assert (saved["test/acc"]["n"], saved["test/acc"]["baseline_n"]) == ("4", "3")
    assert float(saved["test/acc"]["baseline_max"]) == pytest.approx(77.45, rel=1e-5)

    # every metric against one metric of the baseline
    table = table_main([str(runs), "--metrics", "test/acc", "--baseline", "0.5", "--baseline_metric", "best/val/acc",
                        "--no_plot", "--output", str(out)])
    (c,) = table.comparisons
    assert c.baseline_metric == "best/val/acc" and c.diff == pytest.approx(expected - 1.0, rel=1e-9)
    assert "| test/acc vs best/val/acc |" in table.markdown


def test_paired_pairs_each_run_with_the_baselines_run_of_the_same_seed(tmp_path, capsys):
    """Seeds that move both rows together (the same split and initialisation): the ranges overlap, yet every seed's
    difference has one sign; a seed only one row has is left out; two runs of one seed are refused."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed_everything: 0\n")
    runs = tmp_path / "runs"
    base, better = [0.70, 0.80, 0.90], [0.71, 0.81, 0.91, 0.50]  # seed 3 only in the second row
    for rho, accs in ((0.5, base), (1.0, better)):
        for seed, acc in enumerate(accs):
            write_run(runs, f"rho{rho}-s{seed}", cfg, rho, seed, acc)
    common = [str(runs), "--metrics", "test/acc", "--baseline", "rho=0.5", "--no_plot", "--output", str(tmp_path)]
    (unpaired,) = table_main(common).comparisons
    assert unpaired.apart == 0 and len(unpaired.values) == 4
    (paired,) = table_main([*common, "--paired"]).comparisons
    assert paired.paired and paired.values == pytest.approx((71.0, 81.0, 91.0))
    assert paired.baseline_values == pytest.approx((70.0, 80.0, 90.0))
    assert paired.diff == pytest.approx(1.0, rel=1e-9) and paired.apart == 1 and paired.chance == 0.25  # 2 / 2**3
    assert "| `c rho=1.0` | test/acc | +1.00 | 3 vs 3 | above in every run (by chance alone: 0.25) |" in (
        (tmp_path / "table.md").read_text())
    with open(tmp_path / "baseline.csv") as f:
        (saved,) = csv.DictReader(f)
    assert (saved["n"], saved["apart"], float(saved["chance"]), saved["paired"]) == ("3", "1", 0.25, "1")

    write_run(runs, "rho1.0-s1-again", cfg, 1.0, 1, 0.60)  # a second run of seed 1: which one pairs is ambiguous
    with pytest.raises(ValueError, match="--paired: c rho=1.0 holds two runs of seed 1"):
        table_main([*common, "--paired"])
    with pytest.raises(SystemExit):
        table_main([str(runs), "--paired"])
    assert "--paired needs --baseline NAME" in capsys.readouterr().err
    seedless = Row("a", "", [{"metrics": {"m": 1.0}, "run_dir": "/runs/a"}])
    with pytest.raises(ValueError, match=r"a run of a records no seed, so it pairs with no baseline run \(/runs/a\)"):
        compare.compare_rows([seedless, Row("b", "", [])], Row("b", "", []), ["m"], paired=True)


def test_a_baseline_that_names_no_single_row_is_refused_with_the_rows(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed_everything: 0\n")
    write_rho_grid(tmp_path / "runs", cfg)
    for name, says in (("rho", "several rows contain 'rho'"), ("sam", "no row is called or contains 'sam'")):
        with pytest.raises(ValueError, match=f"--baseline '{name}': {says}; the rows are 'c rho=0.5', 'c rho=1.0'"):
            table_main([str(tmp_path / "runs"), "--baseline", name, "--no_plot"])
    assert not (tmp_path / "runs" / "table.md").exists()  # refused before anything was written
    with pytest.raises(SystemExit):
        table_main([str(tmp_path / "runs"), "--baseline_metric", "test/acc"])
    assert "--baseline_metric needs --baseline NAME" in capsys.readouterr().err


def test_the_demos_page_says_which_differences_are_beyond_the_seed_spread(tmp_path):
    """scripts/demos/collect.py turns the table's baseline.csv into the sentences of docs/demos.md, and writes a time
    line only from what was measured (a demo without fit runs, like the federated one, has no empty part)."""
    assert callable(_load_script("scripts/demos/collect.py").main)  # the page script and its parts import
    comparisons, demo_data = _load_script("scripts/demos/comparisons.py"), _load_script("scripts/demos/demo_data.py")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed_everything: 0\n")
    write_rho_grid(tmp_path / "demo", cfg)
    table_main([str(tmp_path / "demo"), "--metrics", "test/acc", "best/val/acc", "--baseline", "rho=0.5", "--no_plot"])
    (line,) = comparisons.effect_lines(tmp_path / "demo")
    diff = 100 * (math.fsum(RHO_ACC[1.0]) / 4 - math.fsum(RHO_ACC[0.5]) / 3)
    assert line == (f"Beyond the seed spread? `c rho=1.0` against `c rho=0.5`: yes for test/acc ({diff:+.2f}, every "
                    f"run above, chance 0.057), best/val/acc ({diff:+.2f}, every run above, chance 0.057).")
    assert demo_data.time_line([], []) == ""
    timed = [{"wall_s": "100.5", "cpu_s": "90", "load1_before": "0.5", "load1_after": "1.5"}]
    assert demo_data.time_line([], timed).startswith("Time: the commands 100 s of wall time summed, 90 s of CPU time")
    assert demo_data.time_line([{"wall_time_s": 30.0}, {"wall_time_s": 41.0}], timed).startswith(
        "Time: 2 fit runs, wall time per run 30-41 s; the commands")
    row = {"apart": "-1", "diff": "-15.72", "chance": "0.0625", "paired": "1"}  # baseline.csv of table --paired
    assert demo_data.verdict(row) == "-15.72, below in every seed, chance 0.062"
    assert demo_data.verdict({**row, "paired": "0"}) == "-15.72, every run below, chance 0.062"
    labels = ["fedfree", "fedfree_skew", "early_cutting_select_seed0", "early_cutting_ce", "ood", "fedfree"]
    rows = [{"demo": label, "threads": threads} for label in labels for threads in ("1", "2")]
    owned = {name: [r["demo"] for r in demo_data.demo_times(rows, name)] for name in ("fedfree", "fedfree_skew",
                                                                                      "early_cutting", "tunnel")}
    assert owned == {"fedfree": ["fedfree", "fedfree"], "fedfree_skew": ["fedfree_skew"],  # one demo's rows each
                     "early_cutting": ["early_cutting_select_seed0", "early_cutting_ce"], "tunnel": []}


def _load_script(relative: str):
    """A script module of the repository (its folder on ``sys.path`` for its sibling modules)."""
    import importlib
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / relative
    sys.path.insert(0, str(path.parent))
    try:
        return importlib.import_module(path.stem)
    finally:
        sys.path.remove(str(path.parent))


def test_a_demos_page_fills_only_the_regions_named_after_it(tmp_path):
    """README regions carry the numbers of one demos page: ``<!-- demos:KEY -->`` the main page's,
    ``<!-- demos_amd_epyc:KEY -->`` that page's; filling from one page leaves the other's regions as they are."""
    regions = _load_script("scripts/demos/regions.py")
    doc = tmp_path / "README.md"
    doc.write_text("a <!-- demos:sam -->old main<!-- /demos:sam --> b <!-- demos_amd_epyc:sam -->old<!-- "
                   "/demos_amd_epyc:sam --> c <!-- demos_amd_epyc:koala -->x<!-- /demos_amd_epyc:koala -->\n")
    regions.fill(doc, {"sam": "NEW", "koala": "K"}, "demos_amd_epyc")
    assert doc.read_text() == ("a <!-- demos:sam -->old main<!-- /demos:sam --> b <!-- demos_amd_epyc:sam -->NEW"
                               "<!-- /demos_amd_epyc:sam --> c <!-- demos_amd_epyc:koala -->K"
                               "<!-- /demos_amd_epyc:koala -->\n")
    regions.fill(doc, {"sam": "MAIN"})
    assert "<!-- demos:sam -->MAIN<!-- /demos:sam -->" in doc.read_text() and "-->NEW<!--" in doc.read_text()


def test_the_readme_line_of_a_demo_against_its_baseline_comes_from_the_tables_files(tmp_path):
    """The SAM / KOALA / distillation demos' README and method-page texts: every row's mean ± std of test/acc (ddof 1),
    and each row's seed-by-seed verdict against the baseline from baseline.csv (``table --paired``), in display %."""
    regions = _load_script("scripts/demos/regions.py")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed_everything: 0\n")
    write_rho_grid(tmp_path / "demos" / "sam", cfg)
    write_run(tmp_path / "demos" / "sam", "rho2.0-s0", cfg, 2.0, 0, 0.7904)  # one run: no spread, no verdict
    table_main([str(tmp_path / "demos" / "sam"), "--output", str(tmp_path / "demos" / "sam"), "--metrics", "test/acc",
                "--baseline", "rho=0.5", "--paired", "--no_plot"])
    texts = regions.versus_summaries(tmp_path / "demos")
    assert set(texts) == {"readme_sam", "sam"}  # the other demos have no runs here

    def pm(values):
        return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"

    paired = [b - a for a, b in zip(RHO_ACC[0.5], RHO_ACC[1.0], strict=False)]  # seed 3 has no baseline run
    assert all(d > 0 for d in paired)
    diff = 100 * (math.fsum(RHO_ACC[1.0][:3]) - math.fsum(RHO_ACC[0.5])) / 3
    assert texts["readme_sam"] == (
        f"seeds 0, 1, 2, 3, test accuracy % after the last epoch: c rho=0.5 {pm(RHO_ACC[0.5])}; c rho=1.0 "
        f"{pm(RHO_ACC[1.0])} (against SGD: {diff:+.2f}, above in every seed, chance 0.25); c rho=2.0 79.0 (one run).")
    assert texts["sam"] == (tmp_path / "demos" / "sam" / "table.md").read_text().strip()
