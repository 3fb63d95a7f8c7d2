"""Write docs/demos.md from the outputs of scripts/demos/run_demos.sh: the tables of ``lightning-methods table``
(and the multibit cost / tunnel per-layer summaries), where and how the runs ran (torch version, threads, CPU,
from the runs' results.json), run times with the load average, and seed 0 with one thread against two threads.

    python scripts/demos/collect.py [runs/demos] [docs/demos.md]
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

DEMOS = (
    (
        "quickstart",
        "Quickstart",
        "`configs/quickstart.yaml` (ResNet-8, 12 epochs; test accuracy of the best checkpoint)",
    ),
    (
        "multibit",
        "EMQ vs Any-Precision",
        "`configs/quantization/digits_emq.yaml` (bit-wise coresets, prune rate 0.5) and "
        "`digits_anyprecision.yaml` (the same without coresets); test accuracy per bit-width (3 bits never trained)",
    ),
    (
        "hpn",
        "HPN multi-task sweep",
        "`configs/hpn/digits_multitask.yaml` over the task weight t (digit accuracy %, ink MAE in lit pixels)",
    ),
    (
        "early_cutting",
        "Early Cutting vs plain CE",
        "`lightning-methods select --config "
        "configs/noisy_labels/digits_sym40.yaml` (rows `seed*`, metric `test_acc_last`) against "
        "`configs/noisy_labels/digits_sym40_ce.yaml` (`test/acc`), 40% symmetric label noise, clean test set",
    ),
    ("tunnel", "Tunnel Effect", "`configs/tunnel/digits_mlp.yaml` (MLP depth 10 / width 128, 30 epochs, TunnelProbe)"),
    ("ood", "EncMin2L OOD", "`lightning-methods ood --config configs/ood/digits_demo.yaml` (AUROC x 100)"),
    (
        "fedfree",
        "FedFree",
        "`lightning-methods fed --config configs/federated/digits_demo.yaml` (final-round client accuracy)",
    ),
)
EXTRA = {"multibit": "cost.md", "tunnel": "summary.md"}
#: What each demo can and cannot show (written with the runs in front of us; the numbers above are generated).
NOTES = {
    "multibit": (
        "EMQ trains on 60% of Any-Precision's training samples here (2 full warm-up epochs, then coresets of half "
        "the data for 10 epochs) but scores the whole training set at every refresh (every 2 epochs: forward passes "
        "only), so its forward passes exceed Any-Precision's; the demo shows the coreset mechanics and the accuracy "
        "per bit-width, not a speed-up. Any-Precision (`digits_anyprecision.yaml`) has a row above only for the "
        "seeds that finished: if it has none, its runs did not finish in the session that generated this file "
        "(about 50 minutes of wall time per run on the loaded 2-core machine), and the demo cannot yet say whether "
        "EMQ is close to it."
    ),
    "hpn": (
        "At t = 0.01 the classification term is too weak to learn in 15 epochs (chance accuracy) while the ink MAE is "
        "lowest; from t = 0.25 both tasks are good; t = 0.9 has the largest MAE of t >= 0.1. Between t = 0.1 and "
        "0.5 the MAE differences are within the seed spread: the demo shows the trade-off at the ends, not the "
        "paper's optimum at t = 0.25."
    ),
    "early_cutting": (
        "Compare `test_acc_last` of the select runs (`seed*` rows) with `test/acc` of `digits_sym40_ce`: both are "
        "the clean test accuracy after the last epoch."
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


def records(folder: Path) -> list[dict]:
    """The fit records (results.json) and select summaries (summary.json) under ``folder``."""
    out = []
    for path in sorted(folder.rglob("results.json")):
        data = json.loads(path.read_text())
        if data.get("command") == "fit":
            out.append(data)
    for path in sorted(folder.rglob("summary.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "test_acc_last" in data:
            data["_path"] = str(path)
            out.append(data)
    return out


def times(root: Path) -> list[dict]:
    path = root / "times.tsv"
    return list(csv.DictReader(path.open(), delimiter="\t")) if path.is_file() else []


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


def run_times(recs: list[dict]) -> str:
    walls = [r["wall_time_s"] for r in recs if r.get("wall_time_s")]
    if not walls:
        return ""
    return f"{len(walls)} fit runs, wall time per run {min(walls):.0f}-{max(walls):.0f} s"


def threads_section(root: Path) -> list[str]:
    two = root / "threads2"
    if not two.is_dir():
        return ["(not run: `scripts/demos/run_demos.sh threads`)"]
    lines = ["| demo | metric | seed 0, 1 thread | seed 0, 2 threads |", "|---|---|---|---|"]
    for name, title, _ in DEMOS:
        one = {_key(r): r for r in records(root / name) if _seed(r) == 0}
        for key, r2 in sorted({_key(r): r for r in records(two / name) if _seed(r) == 0}.items()):
            r1 = one.get(key)
            if r1 is None:
                continue
            for metric in _metrics(r2):
                a, b = _value(r1, metric), _value(r2, metric)
                if a is not None and b is not None:
                    lines.append(f"| {title} ({key}) | {metric} | {a:.4g} | {b:.4g} |")
    return lines


def _seed(r: dict) -> int | None:
    if "seed" in r:
        return r["seed"]
    source = r.get("source") or {}
    return source.get("seed")


def _key(r: dict) -> str:
    if "config_path" in r:
        info = r.get("info") or {}
        over = info.get("combination") or {}
        return (info.get("name") or Path(r["config_path"]).stem) + (f" {over}" if over else "")
    return "select"


def _metrics(r: dict) -> list[str]:
    if "metrics" not in r:
        return ["test_acc_last"]
    return [k for k in sorted(r["metrics"]) if k.startswith("test/acc") and "top5" not in k or k == "test/mae"]


def _value(r: dict, metric: str) -> float | None:
    v = r.get("metrics", r).get(metric)
    return float(v) if isinstance(v, (int, float)) else None


def _csv_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [
        {k.lower() if k in ("Config", "Setting") else k: v for k, v in row.items()}
        for row in csv.DictReader(path.open(encoding="utf-8-sig"))
    ]


def _pm(row: dict, metric: str, digits: int = 1) -> str:
    mean, std = row.get(f"{metric} mean"), row.get(f"{metric} std")
    if not mean:
        return "n/a"
    return f"{float(mean):.{digits}f} ± {float(std or 0):.{digits}f}"


def summaries(base: Path) -> dict[str, str]:
    """Short generated texts for the marked places in README.md and docs/methods/*.md."""
    out: dict[str, str] = {}
    for name, extra in (("multibit", "cost.md"), ("tunnel", "summary.md")):
        parts = [(base / name / f).read_text().strip() for f in ("table.md", extra) if (base / name / f).is_file()]
        if name == "tunnel":
            parts = parts[1:] if len(parts) > 1 else parts
        out[name] = "\n\n".join(parts)
    for name in ("hpn", "early_cutting"):
        path = base / name / "table.md"
        out[name] = path.read_text().strip() if path.is_file() else "(not run yet)"
    bits = (1, 2, 3, 4, 8, 32)
    for row in _csv_rows(base / "multibit" / "table.csv"):
        accs = " / ".join(_pm(row, f"test/acc_bit{b}") for b in bits)
        out[f"readme_multibit_{row['config']}"] = f"{row['config']} ({row['n']} seeds): {accs} % at 1/2/3/4/8/32 bits"
    out["readme_multibit"] = "; ".join(v for k, v in sorted(out.items()) if k.startswith("readme_multibit_")) + (
        " (3 bits never trained; mean ± std, one CPU thread; cost and times in docs/demos.md)"
    )
    hpn = []
    for row in _csv_rows(base / "hpn" / "table.csv"):
        hpn.append(f"{row['setting']}: {_pm(row, 'test/acc')} / {_pm(row, 'test/mae', 3)}")
    out["readme_hpn"] = "; ".join(hpn) if hpn else "(not run yet)"
    tunnel = base / "tunnel" / "summary.md"
    if tunnel.is_file():
        lines = tunnel.read_text().splitlines()
        rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and line[2].isdigit()]
        ranks = " ".join(f"{float(r[3].split('+-')[0]):.0f}" for r in rows)
        accs = [float(r[2].split("+-")[0]) for r in rows]
        out["readme_tunnel"] = (
            f"{lines[0].split(';')[1].strip()}; mean numerical rank per layer {ranks}; mean probe "
            f"accuracy {min(accs):.1f}-{max(accs):.1f}% at every layer (the logits: "
            f"{rows[-1][2].strip()}) - the rank falls in the last layers."
        )
    return out


def fill(path: Path, texts: dict[str, str]) -> None:
    """Replace the text between ``<!-- demos:KEY -->`` and ``<!-- /demos:KEY -->`` (or after a lone opening marker)
    with ``texts[KEY]``."""
    import re

    text = path.read_text()
    for key, value in texts.items():
        start, end = f"<!-- demos:{key} -->", f"<!-- /demos:{key} -->"
        if start not in text:
            continue
        new = f"{start}{value}{end}"
        if end in text:
            text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m, new=new: new, text, flags=re.S)
        else:
            text = text.replace(start, new)
    path.write_text(text)


def main(root: str = "runs/demos", out: str = "docs/demos.md") -> None:
    base = Path(root)
    rows = times(base)
    lines = [
        "# The digits demos: numbers over seeds, times, thread sensitivity",
        "",
        "Generated by `python scripts/demos/collect.py` from the outputs of `scripts/demos/run_demos.sh` (which runs",
        "`lightning-methods grid` / `select` and `lightning-methods table`); do not edit the numbers by hand, rerun:",
        "",
        "```bash",
        "scripts/demos/run_demos.sh && scripts/demos/run_demos.sh threads && python scripts/demos/collect.py",
        "```",
        "",
        f"Machine of these numbers: {machine(base)}.",
        "",
        "Each value is mean ± sample std over seeds 0, 1, 2 (seed_everything and the data seed: split, noise, order,",
        "initialisation). Float results depend on the CPU's kernels, the thread count and library versions, so a",
        "single run's digits are not a claim; the last section shows seed 0 again with two threads.",
        "",
    ]
    for name, title, what in DEMOS:
        folder = base / name
        lines += [f"## {title}", "", what + ".", ""]
        table = folder / "table.md"
        if table.is_file():
            lines += [table.read_text().strip(), ""]
        elif not (name in EXTRA and (folder / EXTRA[name]).is_file()):
            lines += ["(not run yet)", ""]
        if name in EXTRA and (folder / EXTRA[name]).is_file():
            lines += [(folder / EXTRA[name]).read_text().strip(), ""]
        if name in NOTES:
            lines += [NOTES[name], ""]
        t = [r for r in rows if r["demo"].startswith(name) and r["threads"] == "1"]
        if t:
            wall = sum(float(r["wall_s"]) for r in t)
            cpu = sum(float(r["cpu_s"]) for r in t)
            loads = [float(r[k]) for r in t for k in ("load1_before", "load1_after") if r[k]]
            load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded (about 20-25 at the time)"
            lines += [
                f"Time: {run_times(records(folder))}; the commands {wall:.0f} s of wall time summed (some ran in "
                f"parallel), {cpu:.0f} s of CPU time (one thread per run) under a 1-minute load average of {load} "
                "on 2 cores (other jobs running).",
                "",
            ]
    lines += [VIT_NOTE, "## One thread against two (seed 0)", ""] + threads_section(base) + [""]
    Path(out).write_text("\n".join(lines))
    print(f"wrote {out}")
    texts = summaries(base)
    for doc in (
        "README.md",
        "docs/methods/quantization.md",
        "docs/methods/hpn.md",
        "docs/methods/tunnel.md",
        "docs/methods/noisy_labels.md",
    ):
        if Path(doc).is_file():
            fill(Path(doc), texts)


if __name__ == "__main__":
    main(*sys.argv[1:])
