"""Write docs/demos.md from the outputs of scripts/demos/run_demos.sh: the tables of ``lightning-methods table``
(and the multibit cost / tunnel per-layer summaries), whether each method's difference to its baseline is beyond the
seed spread (``table --baseline``'s baseline.csv; EncMin2L against each single detector run by run), where and how
the runs ran (torch version, threads, CPU, from the runs' results.json), run times with the load average, and seed 0
with one thread against two threads.

    python scripts/demos/collect.py [runs/demos] [docs/demos.md] [OTHER_DEMO_DIR ...]

The parts: :mod:`demo_data` (demos, records, tables), :mod:`comparisons` (verdicts against baselines and across
library versions), :mod:`regions` (the generated regions of README.md and the method pages).

Each OTHER_DEMO_DIR holds the quickstart demo run with other library versions (``DEMO_DIR=runs/demos_torch26
scripts/demos/run_demos.sh quickstart`` in another environment); the page compares it with the main runs.
The same demos run on another machine make a page of their own (``collect.py runs/demos_amd docs/demos_amd.md``):
it fills only the regions named after it (``<!-- demos_amd:KEY -->``; the ``<!-- demos:KEY -->`` regions carry the
main page's numbers), and the main page links every ``docs/demos_*.md`` with its machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

from comparisons import other_versions_section
from demo_data import DEMOS, demo_times, records, rows_by_name, seeds_text, time_line, times
from regions import VERSUS_DEMOS, fill, summaries

from lightning_methods.results.aggregate import run_seed, run_value

EXTRA = {"multibit": "cost.md", "tunnel": "summary.md"}


#: What each demo can and cannot show (written with the runs in front of us; the numbers above are generated).
NOTES = {
    "multibit": (
        "EMQ trains on 60% of Any-Precision's training samples here (2 full warm-up epochs, then coresets of half "
        "the data for 10 epochs) but scores the whole training set at every refresh (every 2 epochs: forward passes "
        "only), so its forward passes exceed Any-Precision's; the demo shows the coreset mechanics and the accuracy "
        "per bit-width, not a speed-up. EMQ's mean is below Any-Precision's at every bit-width; whether that is beyond "
        "the seed spread changed with the library versions (the last section), so the demo does not settle it. "
        "`digits_lsq` (LSQ's learned step sizes instead of the DoReFa quantizers, nothing else changed) joined the "
        "demo after the main page's runs were made; in its first runs (docs/demos_amd_epyc.md) its mean is above "
        "Any-Precision's at every bit-width with a smaller spread, within the seed spread: five seeds do not show "
        "an effect of the quantizer here."
    ),
    "hpn": (
        "At t = 0.01 the classification term is too weak to learn in 15 epochs (chance accuracy) while the ink MAE is "
        "lowest: against the paper's choice t = 0.25 that is the one difference beyond the seed spread here. t = 0.1, "
        "0.5 and 0.9 stay within the seed spread of t = 0.25 on both tasks (t = 0.9 has the largest mean MAE; "
        "t = 0.1's lower accuracy is beyond it with other library versions, the last section): the demo shows the "
        "trade-off at the small end, not the paper's optimum at t = 0.25."
    ),
    "early_cutting": (
        "Compare `test_acc_last` of the select runs (`seed*` rows) with `test/acc` of `digits_sym40_ce`: both are "
        "the clean test accuracy after the last epoch."
    ),
    "ood": (
        "Every detector scores the same runs (same splits, encoders and calibration digits), so EncMin2L is compared "
        "with each single detector run by run: the difference has one sign in every run, or it has not. On far OOD "
        "(photo patches) the differences to the Monolithic RDM and to Mahalanobis are within the seed spread on one "
        "of the two CPUs (docs/demos.md, docs/demos_amd_epyc.md) and below in every run on the other: five seeds do "
        "not settle those two."
    ),
    "fedfree": (
        "Local-only trains each client on its own digits; FedAvg averages every layer of the shared CNN each round, "
        "FedProx with a proximal term; Per-FedAvg meta-learns the average and evaluates it after one step on each "
        "client's data; pFedLA mixes every client's layers with weights its per-client hypernetwork learns; FedFree "
        "exchanges only the uploaded layers, through the server's alignment on Gaussian pseudo-data. The comparison "
        "with Local-only says whether each form of sharing helps here beyond the seed spread. FedProx, Per-FedAvg "
        "and pFedLA joined the demo after the main page's runs were made; in their first runs "
        "(docs/demos_amd_epyc.md) FedProx and pFedLA are above Local-only in every run and stay close to FedAvg in "
        "six rounds, and Per-FedAvg, which takes half as many steps (two batches per step), is within the seed "
        "spread of Local-only."
    ),
    "fedfree_skew": (
        "The paper's Table 1 regime (non-IID1: each client holds a few classes) on the same 20 clients, 2 of the 10 "
        "classes each, nothing else changed; the paper reports no Local-only baseline. Each seed gives every "
        "algorithm the same partition and client initialisations, so every algorithm is compared with FedFree seed "
        "by seed (`table --paired`: one sign in every seed, chance 2 / 2^5 = 0.062). This demo joined after the "
        "main page's runs were made: its runs are on the AMD EPYC page (docs/demos_amd_epyc.md)."
    ),
    "sam": (
        "The 12-epoch runs stop short of convergence: the same SGD reaches 99.4% in 30 epochs (next section). At 12 "
        "epochs SAM is within the seed spread of SGD (0.8 points lower), and SAM-ON and ASAM-ON are below SGD in every "
        "seed: at this budget the perturbed gradient slows training down. The rho values were set before the runs "
        "(Foret et al.'s CIFAR value for SAM, 10x that for SAM-ON), not tuned per model as the paper does. The demo "
        "does not show the paper's gain of SAM-ON over SAM and SGD."
    ),
    "sam_long": (
        "With 30 epochs SGD, SAM and SAM-ON all reach about 99.4% on the test split (one or two of its 269 digits "
        "wrong) and are within the seed spread of each other: the 12-epoch gap closes, and at this budget the digits "
        "are too easy to separate the optimizers. Neither schedule shows the paper's gain."
    ),
    "koala": (
        "Every optimizer keeps the settings of its CIFAR-100 file; nothing was tuned for digits, and 12 epochs of 19 "
        "steps give 228 steps in all (76 at the full learning rate). KOALA-M is within the seed spread of SGD. "
        "Adam (lr 3e-4) and KOALA++ are below SGD in every seed: both learn slowly at this budget (mean training loss "
        "of the last epoch about 1.7 for Adam and 1.4 for KOALA++, against 0.13 for SGD and 0.09 for KOALA-M). The "
        "demo shows that KOALA++'s CIFAR settings do not carry over to so short a run; it does not show the paper's "
        "ranking (KOALA++ ahead of SGD and Adam after 100 epochs), and no longer run was made. The KOALA++ update "
        "itself is tested step by step against a float64 implementation of the official recursion "
        "(tests/koala/test_koala_math.py)."
    ),
    "distillation": (
        "All runs share one split, so the seed spread here is that of the student's initialisation and batch order "
        "alone. On the test split no method is apart from the student alone: KD's mean is 1.3 points higher, with a "
        "smaller spread, but not in every seed. On the validation split (the same size, also never trained on) KD and "
        "DKD are above the student in every seed (chance 0.062). The DeepKD versions are within the seed spread on "
        "both splits: the demo does not show DeepKD's gain over its base method. The `digits_teacher` row is the one "
        "teacher (seed 0) and only context: its comparison pairs one seed."
    ),
    "tunnel": (
        "The probe of the output layer (`fc10`, the logits) reaches the model's own test accuracy: the linear probes "
        "are fitted to convergence (L-BFGS)."
    ),
}


VIT_NOTE = (
    "## ViT locality\n\nNo digits demo: the ViT-locality configs need CIFAR / Tiny-ImageNet and many epochs, so the "
    "paper's effect (CutMix lowers the early-layer MAD) is not measured in this project; docs/methods/vit_locality.md "
    "gives the paper's numbers only.\n"
)


def machine(root: Path) -> str:
    for name, *_ in DEMOS:
        for r in records(root / name):
            if "versions" in r and "threads" in r.get("device", {}):
                v, d = r["versions"], r["device"]
                return (
                    f"torch {v['torch']}, lightning {v['lightning']}, Python {v['python']}; CPU "
                    f'"{d.get("cpu")}" ({d["cpus"]} logical CPUs), {d["threads"]} torch thread(s) per run'
                )
    return "unknown"


#: The metrics of the thread comparison (besides every ``test/acc_bit*``).
THREAD_METRICS = ("test/acc", "test/mae", "test_acc_last", "final_mean", "ood/EncMin2L/union/auroc")


def threads_section(root: Path) -> list[str]:
    """Seed 0 of every demo with one thread against two (``run_demos.sh threads``), in the tables' units."""
    two = root / "threads2"
    if not two.is_dir():
        return ["(not run: `scripts/demos/run_demos.sh threads`)"]
    lines = ["| demo | run | metric | seed 0, 1 thread | seed 0, 2 threads |", "|---|---|---|---|---|"]
    for name, title, _ in DEMOS:
        one = rows_by_name(root / name)
        for key, row2 in sorted(rows_by_name(two / name).items()):
            r1 = next((r for r in getattr(one.get(key), "runs", []) if run_seed(r) == 0), None)
            r2 = next((r for r in row2.runs if run_seed(r) == 0), None)
            if r1 is None or r2 is None:
                continue
            metrics = sorted(m for m in r2.get("metrics") or {} if m in THREAD_METRICS or m.startswith("test/acc_bit"))
            for metric in metrics:
                a, b = run_value(r1, metric), run_value(r2, metric)
                if a is not None and b is not None:
                    lines.append(f"| {title} | {key} | {metric} | {a:.4g} | {b:.4g} |")
    return lines


#: The main page; the generated regions of README.md and docs/methods/ carry its numbers.
MAIN_PAGE = "docs/demos.md"


def _commands(root: str, out: str, others: tuple[str, ...]) -> list[str]:
    """The commands that regenerate this page, with the folders it was generated from."""
    env = "" if root == "runs/demos" else f"DEMO_DIR={root} "
    lines = [f"{env}scripts/demos/run_demos.sh && {env}scripts/demos/run_demos.sh threads"]
    lines += [f"DEMO_DIR={o} scripts/demos/run_demos.sh quickstart   # in the environment of the other versions"
              for o in others]
    lines.append(" ".join(["python scripts/demos/collect.py", *([root, out, *others] if others or root != "runs/demos"
                                                               or out != MAIN_PAGE else [])]))
    return lines


def _other_pages(out: Path) -> list[str]:
    """Lines pointing from the main page to the pages of the same demos run elsewhere (``docs/demos_*.md``, written
    by this script with another run folder), and from such a page back to the main one."""
    if out.as_posix() != MAIN_PAGE:
        return [f"The same demos on the main page's machine: {MAIN_PAGE} (the notes below were written for it, except "
                "those of the demos it does not show, written for the runs of this page; the \"last section\" they "
                "cite is its section on other library versions).", ""]
    pages = sorted(out.parent.glob("demos_*.md"))
    if not pages:
        return []
    found = []
    for page in pages:
        line = next((x for x in page.read_text().splitlines() if x.startswith("Machine of these numbers: ")), "")
        found.append(f"[{page.name}]({page.name}) ({line.removeprefix('Machine of these numbers: ').rstrip('.')})")
    return ["The same demos on other machines: " + "; ".join(found) + ".", ""]


def main(root: str = "runs/demos", out: str = MAIN_PAGE, *others: str) -> None:
    base = Path(root)
    rows = times(base)
    lines = [
        "# The digits demos: numbers over seeds, times, thread sensitivity",
        "",
        "Generated by `python scripts/demos/collect.py` from the outputs of `scripts/demos/run_demos.sh` (which runs",
        "`lightning-methods grid` / `select` and `lightning-methods table`); do not edit the numbers by hand, rerun:",
        "",
        "```bash",
        *_commands(root, out, others),
        "```",
        "",
        f"Machine of these numbers: {machine(base)}.",
        "",
        *_other_pages(Path(out)),
        f"Each value is mean ± sample std over seeds {seeds_text(base)} (seed_everything and the data seed: split,",
        "noise, order, initialisation). Float results depend on the CPU's kernels, the thread count and library",
        "versions, so a single run's digits are not a claim; the last section shows seed 0 again with two threads.",
        "A method's difference to its baseline is *beyond the seed spread* when every run of one is above every run",
        "of the other (`lightning-methods table --baseline`; docs/results.md gives the chance of that by the seed",
        "alone: 2 / C(2n, n) for n seeds on each side, 0.008 for 5 against 5).",
        "",
    ]
    texts = summaries(base)
    for name in VERSUS_DEMOS:  # their method pages show the table and what it can and cannot show
        if name in texts and name in NOTES:
            texts[name] += "\n\n" + NOTES[name]
    for name, title, what in DEMOS:
        folder = base / name
        lines += [f"## {title}", "", what + ".", ""]
        table = folder / "table.md"
        if name == "ood" and texts.get("ood_table"):  # one row per detector instead of one column per metric
            lines += [texts["ood_table"], "", "Mean ± std (ddof=1) over the seeds; AUROC x 100.", ""]
        elif table.is_file():
            lines += [table.read_text().strip(), ""]
        elif not (name in EXTRA and (folder / EXTRA[name]).is_file()):
            lines += ["(not run yet)", ""]
        if name in EXTRA and (folder / EXTRA[name]).is_file():
            lines += [(folder / EXTRA[name]).read_text().strip(), ""]
        if name in NOTES:
            lines += [NOTES[name], ""]
        if name == "ood" and texts.get("ood_effect"):  # the other demos' table.md holds their comparison already
            lines += [texts["ood_effect"], ""]
        time = time_line(records(folder), demo_times(rows, name))
        if time:
            lines += [time, ""]
    lines += [VIT_NOTE, "## One thread against two (seed 0)", ""] + threads_section(base) + [""]
    lines += other_versions_section(base, [Path(p) for p in others])
    Path(out).write_text("\n".join(lines))
    print(f"wrote {out}")
    page = "demos" if Path(out).as_posix() == MAIN_PAGE else Path(out).stem  # the regions this page's numbers fill
    for doc in (
        "README.md",
        "docs/methods/sam.md",
        "docs/methods/koala.md",
        "docs/methods/distillation.md",
        "docs/methods/federated.md",
        "docs/methods/ood.md",
        "docs/methods/quantization.md",
        "docs/methods/hpn.md",
        "docs/methods/tunnel.md",
        "docs/methods/noisy_labels.md",
    ):
        if Path(doc).is_file():
            fill(Path(doc), texts, page)


if __name__ == "__main__":
    main(*sys.argv[1:])
