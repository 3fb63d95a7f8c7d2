"""HPN task-weight sweep: one fit + test of an HPNMultiTask config per t; prints accuracy and MAE per t.

Mettes, van der Pol, Snoek. *Hyperspherical Prototype Networks*. NeurIPS 2019, arXiv 1901.10514; the t-sweep of
``L_m = t L_c + (1 - t) L_r`` is Table A of the authors' response (OmniArt; robust to t, best at t = 0.25).

    lightning-methods hpn-sweep --config configs/hpn/digits_multitask.yaml \
        [--task_weights 0.01 0.1 0.25 0.5 0.9] [--out runs/hpn_tsweep] [--threads 1] [any fit override ...]

Each t is one stage of a :class:`lightning_methods.runs.StagedRun` in ``OUT`` (fingerprint of the config file and
the overrides, a lock, atomic writes): ``lightning-methods fit --config CONFIG --model.init_args.task_weight t
--test_after_fit last`` with its checkpoints in ``OUT/t=<t>/checkpoints`` (an interrupted t resumes from its
``last.ckpt``; finished t's are never rerun) and its own W&B run ``<name>-t=<t>``. After every finished t the table
goes to ``OUT/sweep.csv`` and ``OUT/sweep.json``; at the end it is printed and plotted to ``OUT/sweep.png`` (also
logged to the W&B run ``<name>-sweep`` when the config has a ``WandbLogger``). A sweep with another config or other
overrides in the same ``OUT`` stops with a message naming the differing settings.
``--threads`` (torch's intra-op threads) changes float round-off but not the settings: it is kept out of the
fingerprint, and the thread count each t ran with is recorded in its stage record (``state.json``) and in
``sweep.json`` (``"threads"``, per t: one count, or the counts of its parts in order when an interrupted t was
resumed with another; ``OUT/t=<t>/threads.json`` keeps them while the t runs); a resumed sweep whose thread count
differs from a finished t's, or from an interrupted t's earlier part, prints a warning (the t's are computed with
other round-off) and goes on.
Each t runs on one device (``trainer.devices`` 1): the demo is a CPU sweep.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from lightning_methods.losses.hpn import check_task_weight
from lightning_methods.runs import NEUTRAL_KEYS, StagedRun, config_fingerprint
from lightning_methods.utils import atomic_write_text
from lightning_methods.utils.wandb import log_pictures, stage_run_settings

Threads = int | list[int] | None  # a t's torch thread count: one, its parts' counts in order, or not recorded

PAPER_OMNIART = {0.01: (46.6, 65.2), 0.1: (51.2, 64.6), 0.25: (54.5, 64.1), 0.5: (52.6, 68.3), 0.9: (51.4, 83.6)}
METRICS = ("test/acc", "test/acc_top5", "test/mae", "test/rmse", "test/loss_c", "test/loss_r")


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """``["--a.b=1", "--c", "2"]`` -> ``{"a.b": "1", "c": "2"}`` (the forwarded CLI overrides, by key)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(extra):
        key, eq, value = extra[i].lstrip("-").partition("=")
        if not eq and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            value, i = extra[i + 1], i + 1
        out[key] = value
        i += 1
    return out


def sweep_fingerprint(config: Path, extra: list[str]) -> dict[str, Any]:
    """The settings of the sweep that change results: the config (without the swept ``task_weight``) and the
    overrides, both without result-neutral keys (logging, paths, workers)."""
    cfg = yaml.safe_load(config.read_text()) or {}
    cfg.get("model", {}).get("init_args", {}).pop("task_weight", None)
    overrides = {k: v for k, v in parse_overrides(extra).items() if k.rsplit(".", 1)[-1] not in NEUTRAL_KEYS}
    return config_fingerprint({"config": cfg, "overrides": overrides})


def _wandb_init_args(config: Path) -> dict[str, Any] | None:
    """The ``init_args`` of the config's ``WandbLogger`` (``None`` without one)."""
    logger = ((yaml.safe_load(config.read_text()) or {}).get("trainer") or {}).get("logger")
    if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger"):
        return dict(logger.get("init_args") or {})
    return None


def run_one(run: StagedRun, config: Path, t: float, extra: list[str]) -> dict[str, float] | None:
    """Fit + test one task weight (resuming its ``last.ckpt``); returns the test metrics (``None`` off rank 0)."""
    from lightning_methods.cli import build_cli

    stage = f"t={t}"
    ckpt_dir = run.stage_dir(stage) / "checkpoints"
    args = ["fit", "--config", str(config), f"--model.init_args.task_weight={t}", "--test_after_fit=last",
            f"--trainer.default_root_dir={run.stage_dir(stage)}", f"--checkpoint.dirpath={ckpt_dir}"]
    settings = _wandb_init_args(config)
    if settings is not None:  # its own W&B run per t, continued if the t is resumed
        stage_run_settings(settings, run.run_dir.name, stage, run.wandb_id(stage))
        args += [f"--trainer.logger.init_args.name={settings['name']}",
                 f"--trainer.logger.init_args.id={settings['id']}"]
    if (ckpt_dir / "last.ckpt").is_file():
        args.append(f"--ckpt_path={ckpt_dir / 'last.ckpt'}")
    cli = build_cli(args + extra)
    if cli is None:  # killed after its fit and test had finished, before the sweep recorded it: results.json has them
        from lightning_methods.results.record import read_record

        metrics = (read_record(run.stage_dir(stage) / "results.json").get("test") or {}).get("metrics") or {}
    elif not cli.trainer.is_global_zero:
        return None
    elif cli.trainer.interrupted:
        raise RuntimeError(f"the run for t={t} was interrupted; rerun the sweep to resume it")
    else:
        metrics = cli.trainer.callback_metrics
    missing = [k for k in ("test/acc", "test/mae") if k not in metrics]
    if missing:
        raise RuntimeError(f"the run for t={t} logged no {missing}: the sweep needs an HPNMultiTask config with a "
                           f"test split (logged: {sorted(metrics)})")
    return {k: float(metrics[k]) for k in METRICS if k in metrics}


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Accuracy and MAE per t, with the paper's OmniArt numbers beside (for the shape only)."""
    lines = ["     t | test acc % | test MAE | paper OmniArt: style acc % / year MAE",
             "-------+------------+----------+--------------------------------------"]
    for key in sorted(results, key=float):
        row, paper = results[key], PAPER_OMNIART.get(float(key))
        ref = f"{paper[0]:.1f} / {paper[1]:.1f}" if paper else "-"
        lines.append(f"{float(key):6.2f} | {100 * row['test/acc']:10.2f} | {row['test/mae']:8.4f} | {ref}")
    return "\n".join(lines)


def write_results(run: StagedRun, results: dict[str, dict[str, float]],
                  threads: dict[str, Threads] | None = None) -> None:
    """``sweep.json`` (results, torch threads per t, the paper's numbers) and ``sweep.csv`` in the run directory (rank
    zero, atomic)."""
    run.write_json("sweep.json", {"results": results, "threads": dict(threads or {}),
                                  "paper_omniart": {str(k): v for k, v in PAPER_OMNIART.items()}})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["task_weight", *METRICS])
    for key in sorted(results, key=float):
        writer.writerow([key, *(results[key].get(m, "") for m in METRICS)])
    if run.is_writer:
        atomic_write_text(run.run_dir / "sweep.csv", buf.getvalue())


def plot(out: Path, results: dict[str, dict[str, float]]) -> Path:
    """Accuracy and MAE against t (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = sorted(results, key=float)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([float(t) for t in ts], [100 * results[t]["test/acc"] for t in ts], "o-", color="tab:blue")
    ax.set_xlabel("task weight t")
    ax.set_ylabel("test accuracy %", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot([float(t) for t in ts], [results[t]["test/mae"] for t in ts], "s--", color="tab:red")
    ax2.set_ylabel("test MAE", color="tab:red")
    ax.set_title("HPN multi-task: L = t L_c + (1 - t) L_r")
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def warn_thread_mismatch(stage: str, recorded: Threads, threads: int, ran: str = "finished") -> None:
    """Print a warning (stderr) when a t ran (all or part of it) with another torch thread count than this sweep."""
    counts = recorded if isinstance(recorded, list) else [] if recorded is None else [recorded]
    if any(int(c) != threads for c in counts):
        shown = ", then ".join(str(c) for c in counts)
        print(f"warning: {stage} {ran} with {shown} torch threads, this sweep runs with {threads}: thread counts "
              "change float round-off, so the sweep's t's are not computed alike (rerun with --threads "
              f"{counts[0]} to match)", file=sys.stderr)


def start_threads(run: StagedRun, stage: str, threads: int) -> list[int]:
    """The thread counts of ``stage``'s parts including the one starting now (``OUT/t=<t>/threads.json``); an earlier
    part counts only when its ``last.ckpt`` is there to resume from. Warns when an earlier part used another count."""
    path = run.stage_dir(stage) / "threads.json"
    resumed = (run.stage_dir(stage) / "checkpoints" / "last.ckpt").is_file() and path.is_file()
    earlier = [int(c) for c in json.loads(path.read_text())] if resumed else []
    warn_thread_mismatch(stage, earlier, threads, ran="was interrupted after running")
    run.write_json(f"{stage}/threads.json", [*earlier, threads])
    return [*earlier, threads]


def build_parser() -> argparse.ArgumentParser:
    """The sweep's own options; every other argument is a ``fit`` override passed to each run."""
    parser = argparse.ArgumentParser(prog="lightning-methods hpn-sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="an HPNMultiTask fit config")
    parser.add_argument("--task_weights", type=float, nargs="+", default=[0.01, 0.1, 0.25, 0.5, 0.9])
    parser.add_argument("--out", type=Path, default=Path("runs/hpn_tsweep"), help="results directory")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (the demo's tiny model runs fastest on 1, and a shared CPU makes "
                             "more threads far slower); 0 keeps torch's default")
    return parser


def main(args: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the sweep; returns ``{str(t): test metrics}``."""
    opts, extra = build_parser().parse_known_args(args)
    import torch  # after the parser: --help stays fast

    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    threads = torch.get_num_threads()  # what runs (with --threads 0: torch's default)
    if not opts.config.is_file():
        raise SystemExit(f"config {opts.config} does not exist")
    for t in opts.task_weights:
        check_task_weight(t)
    trainer_cfg = (yaml.safe_load(opts.config.read_text()) or {}).get("trainer") or {}
    devices = parse_overrides(extra).get("trainer.devices", trainer_cfg.get("devices", 1))
    if str(devices) != "1":
        raise SystemExit(f"the sweep runs each t on one device (devices={devices!r}); for a multi-GPU run of one t use "
                         "`lightning-methods fit --config CONFIG --model.init_args.task_weight T`")
    results: dict[str, dict[str, float]] = {}
    thread_counts: dict[str, Threads] = {}
    with StagedRun(opts.out, "hpn_tsweep", sweep_fingerprint(opts.config, extra),
                   config_text=opts.config.read_text()) as run:
        for t in opts.task_weights:
            stage = f"t={t}"
            if run.is_done(stage):
                print(f"{stage}: finished earlier, skipped")
                warn_thread_mismatch(stage, (run.record(stage) or {}).get("threads"), threads)
            else:
                parts = start_threads(run, stage, threads)
                row = run_one(run, opts.config, t, extra)
                if row is None:  # not rank 0
                    continue
                run.mark_done(stage, {**row, "threads": parts[0] if len(set(parts)) == 1 else parts})
                print(f"{stage}: test acc {100 * row['test/acc']:.2f}%  test MAE {row['test/mae']:.4f}")
            record = dict(run.record(stage) or {})
            thread_counts[str(t)] = record.pop("threads", None)  # None: finished by a version that did not record it
            results[str(t)] = record
            write_results(run, results, thread_counts)
        if results and run.is_writer:
            print(format_table(results))
            png = plot(run.run_dir, results)
            print(f"results: {run.run_dir / 'sweep.csv'}, {run.run_dir / 'sweep.json'}, {png}")
            logger_off = str(parse_overrides(extra).get("trainer.logger", "")).lower() in ("false", "null", "none")
            settings = None if logger_off else _wandb_init_args(opts.config)
            if settings is not None:  # the picture also goes to W&B: run <name>-sweep in the sweep's group
                stage_run_settings(settings, run.run_dir.name, "sweep", run.wandb_id("sweep"))
                log_pictures({"hpn/sweep": png}, settings=settings)
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
