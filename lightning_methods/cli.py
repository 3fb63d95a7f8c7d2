"""``lightning-methods`` command line: LightningCLI with subcommands fit / validate / test / predict.

- model and data are chosen in subclass mode (``model.class_path``, ``data.class_path``); short class names of
  this package resolve because its modules are imported here;
- ``data.num_classes`` is linked to ``model.init_args.num_classes``;
- the resolved config of a fit is saved in its own run directory (``<run dir>/config.yaml``) and, when a
  ``WandbLogger`` is used, written into the W&B run config; every fit prints its run id and resume command, and
  ``--ckpt_path last`` finds the run of the same config (``lightning_methods.cli_runs``);
- ``--checkpoint.*`` configures the always-present ModelCheckpoint (best ``val/acc`` plus ``last.ckpt``, crash-safe
  and checksummed: ``lightning_methods.checkpoint_io``); ``--nonfinite_guard.*`` stops diverged runs;
- checkpoints load with ``--weights_only true`` by default;
- ``--test_after_fit best|last`` runs the test set after ``fit`` on the best checkpoint or the final weights;
- ``trainer.precision`` defaults to ``bf16-mixed`` on a GPU that supports it and ``32-true`` otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning_methods._lazy import lazy_exports

#: the LightningCLI subclass and ``build_cli`` live in ``cli_lightning.py`` and are imported on first use, so the
#: package's own commands (``lightning-methods list``, ``--help`` of any command) do not pay for importing Lightning
__getattr__, __dir__, _ = lazy_exports(
    __name__, {"lightning_methods.cli_lightning": ("LightningMethodsCLI", "LoggerSaveConfigCallback", "build_cli")}
)


def default_precision() -> str:
    """bf16-mixed on a CUDA GPU with bf16 support, 32-true otherwise."""
    import torch

    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


#: Packages whose public classes the parsers resolve by short name (``--model ImageClassifier``, ``--data
#: DigitsDataModule``, ``class_path: NoisyDigitsDataModule``): jsonargparse finds only subclasses already imported, and
#: the package ``__init__``s import lazily.
SHORT_NAME_PACKAGES = (
    "lightning_methods", "lightning_methods.datamodules", "lightning_methods.callbacks", "lightning_methods.optim",
    "lightning_methods.distillation", "lightning_methods.noisy_labels", "lightning_methods.quantization",
    "lightning_methods.hpn", "lightning_methods.vit_locality", "lightning_methods.ood",
)


def import_public_classes(packages: tuple[str, ...] = SHORT_NAME_PACKAGES) -> None:
    """Import every public name of ``packages``, so their classes resolve by short name in a parser (a package whose
    optional dependency is missing is left out)."""
    import importlib

    for package in packages:
        try:
            module = importlib.import_module(package)
            for name in getattr(module, "__all__", ()):
                getattr(module, name)
        except ImportError:
            continue


#: The package's commands besides LightningCLI's fit / validate / test / predict. Each runs as ``lightning-methods
#: <name> ...`` and as the console script ``lightning-methods-<name> ...``; its module (imported only when the command
#: runs) has ``main(args: list[str] | None = None)`` and a module docstring whose first line is the help summary.
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("lightning_methods.results.catalog", "methods, configs, backbones and DataModules of the package"),
    "grid": ("lightning_methods.results.grid", "run a config over seeds and a grid of overrides (resumable)"),
    "table": ("lightning_methods.results.table", "mean +- std tables and learning curves from finished runs"),
    "select": ("lightning_methods.noisy_labels.cli", "Early Cutting: selection rounds, the cut, final training"),
    "fed": ("lightning_methods.federated.cli", "federated rounds (FedFree and the HtFL/HmFL baselines)"),
    "ood": ("lightning_methods.ood.cli", "EncMin2L OOD pipeline: embed, fit RDMs, score, calibrate, report"),
    "prototypes": ("lightning_methods.hpn.cli", "hyperspherical prototypes for HPN (.npy)"),
    "hpn-sweep": ("lightning_methods.hpn.sweep", "HPN multi-task sweep over the task weight t (accuracy, MAE)"),
    "locality": ("lightning_methods.vit_locality.cli", "attention-locality table from ViT checkpoints"),
    "probe": ("lightning_methods.tunnel.cli", "Tunnel Effect: layer-wise linear probes and rank of a checkpoint"),
    "prepare-data": ("lightning_methods.imagenet.prepare",
                     "ImageNet-scale data: sort val/, convert to streaming, demo"),
}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def run_command(name: str, args: list[str] | None = None) -> Any:
    """Run the package command ``name`` (a key of :data:`COMMANDS`) with ``args``."""
    import importlib

    from lightning_methods.utils.quiet import quiet_trainers

    module = importlib.import_module(COMMANDS[name][0])
    args = None if args is None else resolve_configs(args)
    with quiet_trainers():  # their many Trainers: Lightning's device lines once, no tips
        return module.main(args)


def _command_help() -> str:
    width = max(map(len, COMMANDS)) + 2
    lines = ["", "Commands of the package (also installed as lightning-methods-<command>; each has --help):"]
    lines += [f"  {name:<{width}}{summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-methods`` console script: LightningCLI's subcommands, or one of
    :data:`COMMANDS` (``lightning-methods list``, ``lightning-methods select --config ...``). From the console
    (``args=None``) an error of the package ends with its own message, framed, as the last lines (exit code 1)."""
    if args is None:
        console(main, sys.argv[1:])
        return
    argv = resolve_configs(args)
    if argv and argv[0] in COMMANDS:
        run_command(argv[0], argv[1:])
        return
    if argv and argv[0] == "fit":
        check_fit_config(argv[1:])  # a config of select / fed / ood: name the command to use
    from lightning_methods.cli_lightning import build_cli

    if argv and argv[0] in ("-h", "--help"):
        try:
            build_cli(argv)
        finally:
            print(_command_help())
        return
    build_cli(argv)


#: Top-level config keys that only a config of another command has: ``fit`` on such a config names the command.
OTHER_COMMAND_KEYS: dict[str, tuple[str, ...]] = {
    "select": ("selection",),
    "fed": ("federation", "algorithm"),
    "ood": ("encoders", "rdm", "fusion"),
}


def option_values(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """The values given in ``argv`` to the options ``names``, in order (both ``--opt V`` and ``--opt=V``)."""
    values = []
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(tuple(f"{name}=" for name in names if name.startswith("--"))):
            values.append(arg.split("=", 1)[1])
    return values


def config_files(argv: list[str]) -> list[str]:
    """The ``--config`` / ``-c`` files named in ``argv`` (both ``--config F`` and ``--config=F``)."""
    return option_values(argv, ("-c", "--config"))


def resolve_configs(argv: list[str]) -> list[str]:
    """``argv`` with each relative ``--config`` / ``-c`` file that is missing from the current folder but present in
    the source tree this package runs from (``configs/...`` as the docs write them, typed in another folder) replaced
    by that file, with a note on stderr naming both; every other argument unchanged."""
    tree = Path(__file__).resolve().parents[1]
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("-c", "--config") and i + 1 < len(out):
            at, value, prefix = i + 1, out[i + 1], ""
        elif arg.startswith("--config="):
            at, value, prefix = i, arg.split("=", 1)[1], "--config="
        else:
            continue
        path = Path(value)
        if path.is_absolute() or path.exists() or not (tree / "configs").is_dir() or not (tree / path).is_file():
            continue
        out[at] = prefix + str(tree / path)
        print(f"[lightning-methods] {value} is not in {Path.cwd()}: using {tree / path} (the package's own)",
              file=sys.stderr, flush=True)
    check_repeated_keys(out)
    return out


def repeated_keys(text: str) -> list[tuple[str, int]]:
    """The keys that appear a second time in one mapping of the YAML ``text``, with the line (1-based) of each
    repetition; ``[]`` for text that is not valid YAML (the parser names what is wrong with it)."""
    import yaml

    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return []
    found, stack = [], [d for d in documents if d is not None]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    if key.value in seen:
                        found.append((key.value, key.start_mark.line + 1))
                    seen.add(key.value)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return sorted(found, key=lambda item: item[1])


def check_repeated_keys(argv: list[str]) -> None:
    """Stop before anything runs when a YAML file given in ``argv`` (``--config`` files and YAML values of other
    options) repeats a key in one mapping: YAML loaders, the config parser's included, keep the last value silently.

    Raises:
        ValueError: naming the file, each repeated key and its line.
    """
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
        if not value.endswith((".yaml", ".yml")):
            continue
        path = Path(value).expanduser()
        try:
            text = path.read_text(encoding="utf-8") if path.is_file() else None
        except (OSError, UnicodeDecodeError):
            continue  # the parser names a file it cannot read
        found = repeated_keys(text) if text else []
        if found:
            where = ", ".join(f"{key!r} again on line {line}" for key, line in found)
            raise ValueError(f"{path}: a key appears twice in one mapping ({where}); YAML keeps only the last value "
                             "without a word, so the file may not say what you meant: keep one of each.")


def check_fit_config(argv: list[str]) -> None:
    """Stop with one line naming the command to use when a ``--config`` of ``fit`` belongs to another command
    (``select``, ``fed``, ``ood``), instead of the parser's list of every key it does not know.

    Raises:
        SystemExit: a config of another command (message: which command and the command line to run).
    """
    import yaml

    for path in config_files(argv):
        try:
            with open(path, encoding="utf-8") as f:
                keys = set(yaml.safe_load(f) or {})
        except (OSError, yaml.YAMLError, TypeError, ValueError):
            continue  # a missing or broken file: LightningCLI's own error names it
        for command, markers in OTHER_COMMAND_KEYS.items():
            found = sorted(keys.intersection(markers))
            if found:
                raise SystemExit(
                    f"lightning-methods fit: error: {path} is a config of `lightning-methods {command}` (it has the "
                    f"top-level key {found[0]!r}); run: lightning-methods {command} --config {path}"
                )


def console(fn: Any, *args: Any) -> None:
    """Run a console-script entry ``fn(*args)`` and return nothing: the console-script wrapper passes the return value
    to ``sys.exit``, where anything but ``None`` means failure (exit status 1, the value printed to stderr). An error
    raised by lightning-methods code exits with status 1 after its traceback and the package's own message, framed, as
    the last lines (:func:`lightning_methods.cli_runs.print_package_error`); other errors propagate unchanged.
    Lightning is imported only when such an error has to be printed."""
    try:
        fn(*args)
    except SystemExit as exc:
        if type(exc).__name__ == "SIGTERMException" and not exc.code:  # Lightning's SIGTERM stop: exit as a killed
            print("[lightning-methods] stopped by SIGTERM; the run is recorded as interrupted",  # process does, not 0
                  file=sys.stderr, flush=True)
            raise SystemExit(143) from None
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - re-raised unless the package raised it
        from lightning_methods.cli_runs import print_package_error

        if print_package_error(exc):
            raise SystemExit(1) from None
        raise


def _script(name: str) -> Any:
    def entry(args: list[str] | None = None) -> Any:
        if args is None:  # the console script: the package's own error message last (see main)
            console(run_command, name, sys.argv[1:])
            return None
        return run_command(name, args)

    entry.__name__ = entry.__qualname__ = f"{name.replace('-', '_')}_main"
    entry.__doc__ = f"Entry point of the ``lightning-methods-{name}`` console script: {COMMANDS[name][1]}."
    return entry


list_main = _script("list")
grid_main = _script("grid")
table_main = _script("table")
select_main = _script("select")
fed_main = _script("fed")
ood_main = _script("ood")
prototypes_main = _script("prototypes")
hpn_sweep_main = _script("hpn-sweep")
locality_main = _script("locality")
probe_main = _script("probe")
prepare_data_main = _script("prepare-data")


if __name__ == "__main__":  # pragma: no cover
    main()
