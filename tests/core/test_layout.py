"""The package layout keeps its promises: every package directory ships in the wheel, every module imports in a fresh
interpreter (no import cycles), old import paths and old checkpoints keep working, and subclasses of the base module
and DataModule forward every base argument (none is dropped silently)."""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule

import lightning_methods
from lightning_methods import ImageClassifier
from lightning_methods.datamodules import ImageDataModule
from lightning_methods.hparams import public_path

from helpers import TinyNet, quiet_trainer

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def shipped_packages() -> dict[str, Path]:
    """Package name -> directory, as setuptools maps them (pyproject ``packages`` + ``package-dir``)."""
    setup = PYPROJECT["tool"]["setuptools"]
    roots = setup["package-dir"]
    out = {}
    for name in setup["packages"]:
        base = max((k for k in roots if name == k or name.startswith(k + ".")), key=len)
        rest = name[len(base):].lstrip(".")
        out[name] = REPO / roots[base] / Path(*rest.split(".")) if rest else REPO / roots[base]
    return out


def package_dirs() -> dict[Path, str]:
    """Every directory of the tree that is a package of the distribution, with its import name."""
    found = {}
    for top, name in (("lightning_methods", "lightning_methods"), ("datamodules", "lightning_methods.datamodules"),
                      ("callbacks", "lightning_methods.callbacks")):
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / top)
            found[init.parent] = ".".join([name, *rel.parts])
    return found


def test_every_package_directory_is_in_the_wheel_configuration():
    shipped = shipped_packages()
    for directory, name in package_dirs().items():
        assert name in shipped, f"{directory} is not listed in pyproject.toml [tool.setuptools] packages"
        assert shipped[name].resolve() == directory.resolve(), name
    for name, directory in shipped.items():
        assert (directory / "__init__.py").is_file(), f"{name} is listed but {directory} is not a package"


def all_modules() -> list[str]:
    mods = []
    for directory, name in package_dirs().items():
        mods.append(name)
        mods += [f"{name}.{p.stem}" for p in directory.glob("*.py") if p.stem != "__init__"]
    return sorted(mods)


def module_files() -> dict[str, Path]:
    out = {}
    for directory, name in package_dirs().items():
        out[name] = directory / "__init__.py"
        out.update({f"{name}.{p.stem}": p for p in directory.glob("*.py") if p.stem != "__init__"})
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports at module level (imports inside functions are lazy and cannot cycle)."""
    import ast

    files = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.parse(path.read_text()).body:  # top level only
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                # a module importing its own ancestor package is the normal parent-first order, not a cycle
                if target and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
    return graph


def test_no_import_cycles_between_modules():
    graph, index, low, stack, on_stack, cycles = import_graph(), {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"module-level import cycles: {cycles}"


def test_every_module_imports_in_a_fresh_interpreter():
    """A fresh interpreter imports the package (first: every subpackage starts with it) and then every module."""
    modules = all_modules()
    script = ("import importlib, sys, warnings\nwarnings.simplefilter('ignore')\nfailed = []\n"
              "for name in sys.argv[1:]:\n    try:\n        importlib.import_module(name)\n"
              "    except Exception as err:\n        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
              "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n")
    proc = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------- light imports
#: statement -> heavy modules it must not load. Package ``__init__`` files hand their names on lazily, so importing
#: one optimizer costs torch and that optimizer's modules, not Lightning, timm, plotting or W&B.
LIGHT_IMPORTS = {
    "import lightning_methods": ("torch", "lightning", "matplotlib", "wandb"),
    "import lightning_methods.callbacks, lightning_methods.datamodules": ("torch", "lightning", "matplotlib", "wandb"),
    "from lightning_methods.optim import SAMON, SSAM, KOALAPlusPlus, DeepKD": (
        "lightning", "timm", "torchvision", "matplotlib", "wandb", "torchmetrics"),
    "from lightning_methods.losses import kd_loss, dkd_loss": ("lightning", "timm", "torchvision", "wandb"),
    "from lightning_methods.parameters import parameter_roles": ("lightning", "timm", "matplotlib", "wandb"),
    "from lightning_methods.callbacks import NonFiniteGuard": ("timm", "wandb"),
    "from lightning_methods.datamodules import CIFAR100DataModule": ("timm", "wandb"),
}


@pytest.mark.parametrize("statement", sorted(LIGHT_IMPORTS))
def test_public_imports_load_only_what_they_need(statement):
    heavy = LIGHT_IMPORTS[statement]
    script = f"import sys\n{statement}\nprint(' '.join(m for m in {heavy!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [], f"{statement!r} loaded {proc.stdout.split()}"


def test_lazy_names_resolve_and_unknown_names_fail_clearly():
    import lightning_methods.callbacks as callbacks
    import lightning_methods.optim as optim

    assert optim.SAMON.__name__ == "SAMON" and "SAMON" in dir(optim) and "SAMON" in optim.__all__
    assert callbacks.LatestCheckpoint.__module__ == "lightning_methods.callbacks.checkpoint"
    with pytest.raises(AttributeError, match="lightning_methods.optim.*NoSuchOptimizer"):
        optim.NoSuchOptimizer  # noqa: B018


def test_public_paths_are_the_shortest_importable_ones():
    from lightning_methods.callbacks import KOALAMonitor
    from lightning_methods.optim import SAM

    assert public_path(SAM) == "lightning_methods.optim.SAM"
    assert public_path(KOALAMonitor) == "lightning_methods.callbacks.KOALAMonitor"
    assert public_path(torch.optim.SGD) == "torch.optim.SGD"
    assert public_path(lightning_methods.CoTrainingClassifier) == "lightning_methods.CoTrainingClassifier"


def test_checkpoint_with_long_module_paths_loads_and_is_rewritten_short(tmp_path):
    """A checkpoint whose class and optimizer are recorded under their defining modules' paths (as a config that
    spells them so writes them) loads with weights_only, and is saved again under the shortest public paths."""
    from lightning_methods import CoTrainingClassifier
    from lightning_methods.optim import KOALAPlusPlus

    model = CoTrainingClassifier(backbone="resnet8", num_classes=4, optimizer=functools.partial(KOALAPlusPlus))
    trainer = quiet_trainer(max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    ckpt = torch.load(tmp_path / "new.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = "lightning_methods.noisy_labels.cotraining.CoTrainingClassifier"
    ckpt["hyper_parameters"]["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    ckpt["hyper_parameters"]["optimizer"] = {"class_path": "lightning_methods.optim.koala.KOALAPlusPlus",
                                             "init_args": {}}
    torch.save(ckpt, tmp_path / "old.ckpt")
    loaded = LightningModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert type(loaded) is CoTrainingClassifier and loaded.num_classes == 4
    assert isinstance(loaded.configure_optimizers()[0][0], KOALAPlusPlus)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # what the new layout writes: the shortest public paths (LightningCLI records the class as the config spelled it)
    loaded.hparams["_class_path"] = "lightning_methods.noisy_labels.cotraining.CoTrainingClassifier"
    trainer.strategy.connect(loaded)
    trainer.save_checkpoint(tmp_path / "again.ckpt")
    hp = torch.load(tmp_path / "again.ckpt", weights_only=True)["hyper_parameters"]
    assert hp["_class_path"] == "lightning_methods.CoTrainingClassifier"
    assert hp["optimizer"]["class_path"] == "lightning_methods.optim.KOALAPlusPlus"


# ---------------------------------------------------------------------------------------------------- forwarding
def subclasses(base: type) -> list[type]:
    import importlib

    for name in all_modules():  # import everything so every subclass is known
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                importlib.import_module(name)
            except ImportError:  # optional extras (flwr, torchdiffeq) are covered by their families' tests
                pass
    seen, todo = [], [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen and sub.__module__.startswith("lightning_methods"):
                seen.append(sub)
                todo.append(sub)
    return seen


#: Non-default values for every ImageClassifier argument, and how to read each back from the module.
CLASSIFIER_ARGS = {
    "num_classes": (7, lambda m: m.num_classes),
    "optimizer": (functools.partial(torch.optim.SGD, lr=0.3), lambda m: m.optimizer_factory.keywords["lr"] == 0.3),
    "lr_scheduler": (functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2),
                     lambda m: m.scheduler_factory.keywords["step_size"] == 2),
    "scheduler_interval": ("step", lambda m: m.scheduler_interval),
    "scheduler_monitor": ("val/acc", lambda m: m.scheduler_monitor),
    "label_smoothing": (0.1, lambda m: m.label_smoothing),
    "no_weight_decay_roles": (["bias"], lambda m: m.no_weight_decay_roles),
    "grad_clip_norm": (2.0, lambda m: m.grad_clip_norm),
    "channels_last": (True, lambda m: m.channels_last),
    "compile": (True, lambda m: m.compile_backbone),
    "bn_bypass_second_pass": (False, lambda m: m.bn_bypass_second_pass),
    "backbone_kwargs": ({"width": 4}, lambda m: m.backbone_kwargs),
}
#: Arguments a subclass needs besides the base ones (keyed by class name), for the forwarding test.
SUBCLASS_EXTRAS = {
    **{name: lambda: {"teacher": TinyNet(7), "log_teacher_accuracy": False}
       for name in ("KDClassifier", "DKDClassifier", "DeepKDClassifier", "KDDeepKDClassifier")},
    "MultiBitClassifier": lambda: {"keep_first": False},  # TinyNet's only conv is its first layer
    **{name: lambda: {"backbone": _fed_client()} for name in ("FedClientModule", "FedProxClientModule",
                                                              "FedProtoClientModule", "FedTGPClientModule",
                                                              "PerFedAvgClientModule")},
    "FedKDClientModule": lambda: {"backbone": _fed_client(), "mentee": _fed_client(),
                                  "w_h": torch.nn.Linear(512, 512, bias=False)},
}


def _fed_client():
    from lightning_methods.models import create_backbone

    return create_backbone("fed_cnn", 7)


def test_the_forwarding_table_covers_every_base_argument():
    params = set(inspect.signature(ImageClassifier.__init__).parameters) - {"self", "backbone"}
    assert params == set(CLASSIFIER_ARGS)


def _refused(err: Exception, arg: str) -> bool:
    text = str(err)
    return arg in text or arg.replace("_", " ") in text


#: bases that are not methods by themselves (their concrete subclasses are tested)
ABSTRACT = {"DistillationClassifier"}


@pytest.mark.parametrize("cls", [c for c in subclasses(ImageClassifier) if c.__name__ not in ABSTRACT],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("arg", sorted(CLASSIFIER_ARGS))
def test_classifier_subclasses_forward_or_refuse_every_base_argument(cls, arg, monkeypatch):
    """Each base argument either arrives (attribute and hyperparameter) or is refused with an error naming it."""
    from lightning_methods.models import registry

    monkeypatch.setitem(registry._REGISTRY, "tiny_for_forwarding", lambda num_classes, width=8: TinyNet(num_classes,
                                                                                                         width))
    value, read = CLASSIFIER_ARGS[arg]
    kwargs = {"backbone": "tiny_for_forwarding", **SUBCLASS_EXTRAS.get(cls.__name__, dict)(), arg: value}
    try:
        model = cls(**kwargs)
    except (ValueError, TypeError) as err:
        assert _refused(err, arg), f"{cls.__name__}({arg}=...) failed without naming {arg}: {err}"
        return
    got = read(model)
    assert got is True or got == value, f"{cls.__name__} dropped {arg}: {got!r} != {value!r}"
    if not callable(value):
        assert model.hparams[arg] == value, arg


DATAMODULE_ARGS = {"batch_size": 3, "eval_batch_size": 5, "num_workers": 0, "val_split": 0.2, "augment": "crop",
                   "gpu_resident": True, "cutmix_alpha": 0.5, "mixup_alpha": 0.25, "seed": 7, "pin_memory": False}


#: Arguments a DataModule needs besides the base ones (keyed by class name), for the forwarding test.
DATAMODULE_EXTRAS = {
    "CorruptedDataModule": lambda: {"base": _cifar10()},
    "ArrayDataModule": lambda: {"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "targets": torch.zeros(2),
                                "num_classes": 2, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},
}


def _cifar10():
    from lightning_methods.datamodules import CIFAR10DataModule

    return CIFAR10DataModule(num_workers=0)


def test_the_datamodule_table_covers_every_base_argument():
    assert set(inspect.signature(ImageDataModule.__init__).parameters) - {"self"} == set(DATAMODULE_ARGS)


@pytest.mark.parametrize("cls", [c for c in subclasses(ImageDataModule) if not inspect.isabstract(c)],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("arg", sorted(DATAMODULE_ARGS))
def test_datamodule_subclasses_forward_or_refuse_every_base_argument(cls, arg):
    """Each base argument either arrives (attribute and hyperparameter) or is refused with an error naming it."""
    value = DATAMODULE_ARGS[arg]
    try:
        dm = cls(**DATAMODULE_EXTRAS.get(cls.__name__, dict)(), **{arg: value})
    except (ValueError, TypeError) as err:
        assert _refused(err, arg), f"{cls.__name__}({arg}=...) failed without naming {arg}: {err}"
        return
    assert getattr(dm, arg) == value, f"{cls.__name__} dropped {arg}"
    assert dm.hparams[arg] == value
