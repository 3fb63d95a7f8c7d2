"""Loading frozen CIFAR-100 and ImageNet teachers for :class:`lightning_methods.DistillationClassifier`.

Accepted teacher checkpoints (nothing is downloaded unless a ``torchvision:`` weights name asks for it):

- the widely shared CIFAR-100 teacher files of CRD / mdistiller (``cifar_teachers.tar`` from the mdistiller
  release "checkpoints"): a dict whose ``"model"`` key holds the state dict, laid out as
  ``cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth``. Give the file, its ``<name>_vanilla/`` folder or the
  ``cifar_teachers/`` folder itself;
- a lightning-methods checkpoint (``.ckpt`` of an ImageClassifier, e.g. from the teacher configs under
  ``configs/distillation/teachers/``; the ``backbone.*`` weights are used);
- a plain state dict saved with ``torch.save`` (e.g. torchvision's ImageNet file ``resnet34-b627a593.pth``, for the
  ``imagenet_resnet*`` teachers);
- ``"torchvision:<Weights>.<NAME>"`` (e.g. ``"torchvision:ResNet34_Weights.IMAGENET1K_V1"``): torchvision's weights
  API, downloaded once into the torch hub cache (hash-checked, ``weights_only=True``) when online; offline, download
  the weights' URL elsewhere and pass the file.

The state dict is loaded with ``strict=True`` into ``create_backbone(name, num_classes)``; the parameter names of the
zoo equal mdistiller's. Any mismatch stops with a message naming the expected layout and the training config.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lightning_methods.models import create_backbone
from lightning_methods.utils.io import safe_torch_load

TEACHER_FILE = "ckpt_epoch_240.pth"
#: teachers of the CIFAR-100 zoo with a training config under configs/distillation/teachers/
ZOO_TEACHERS = ("resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "ResNet50")


def _how_to_get(name: str) -> str:
    if name.lower().startswith("imagenet_"):
        return (f"Expected ImageNet weights for the architecture {name!r}: 'torchvision:<Weights>.<NAME>' (e.g. "
                "'torchvision:ResNet34_Weights.IMAGENET1K_V1'), torchvision's weights file itself (a plain state "
                "dict), or the last.ckpt of an ImageClassifier with this backbone.")
    return (
        f"Expected a teacher checkpoint for the architecture {name!r}: either the shared CIFAR-100 teacher file "
        f"(mdistiller release 'cifar_teachers.tar', layout cifar_teachers/{name}_vanilla/{TEACHER_FILE}, a dict whose "
        f"'model' key holds the state dict; pass the file, its folder or the cifar_teachers/ folder), or the last.ckpt "
        f"of an ImageClassifier with backbone {name!r}, e.g. from `lightning-methods fit --config "
        f"configs/distillation/teachers/{name.lower()}.yaml` (teacher configs: {', '.join(ZOO_TEACHERS)})."
    )


#: prefix of a teacher given through torchvision's weights API instead of a file
WEIGHTS_PREFIX = "torchvision:"


def torchvision_state_dict(spec: str) -> dict[str, torch.Tensor]:
    """The state dict of torchvision weights ``"torchvision:<Weights>.<NAME>"`` (e.g.
    ``"torchvision:ResNet50_Weights.IMAGENET1K_V1"``) through ``torchvision.models.get_weight(...).get_state_dict``
    (torch hub cache, SHA-256 prefix check, ``weights_only=True``).

    Raises:
        ValueError: the name is not a torchvision weights enum entry.
        RuntimeError: the download failed (offline); the message gives the URL to fetch and pass as a file.
    """
    from torchvision.models import get_weight

    name = spec[len(WEIGHTS_PREFIX):] if spec.startswith(WEIGHTS_PREFIX) else spec
    try:
        weights = get_weight(name)
    except (KeyError, ValueError) as err:
        raise ValueError(f"unknown torchvision weights {name!r} in teacher_checkpoint {spec!r} ({err}); give "
                         "'torchvision:<Weights>.<NAME>', e.g. 'torchvision:ResNet34_Weights.IMAGENET1K_V1'") from err
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except OSError as err:  # URLError, connection errors and hash failures on a partial file
        raise RuntimeError(f"could not download the teacher weights {name} from {weights.url} ({err}). Offline: "
                           "download that file on a machine with network access and pass its path as "
                           "model.teacher_checkpoint.") from err


def resolve_teacher_path(path: str | Path, name: str) -> Path:
    """Find the checkpoint file for teacher ``name`` given a file, a ``<name>_vanilla/`` folder or the
    ``cifar_teachers/`` folder; raises ``FileNotFoundError`` with the expected layout otherwise."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        candidates = [p / TEACHER_FILE, p / f"{name}_vanilla" / TEACHER_FILE]
        wanted = f"{name.lower()}_vanilla"  # names are case-insensitive (resnet50_vanilla / ResNet50_vanilla)
        candidates += [d / TEACHER_FILE for d in sorted(p.glob("*_vanilla")) if d.name.lower() == wanted]
        for c in candidates:
            if c.is_file():
                return c
        raise FileNotFoundError(f"no teacher checkpoint for {name!r} in the folder {p} (looked for "
                                f"{', '.join(str(c) for c in candidates[:2])}). {_how_to_get(name)}")
    raise FileNotFoundError(f"teacher checkpoint {p} does not exist. {_how_to_get(name)}")


def _read(path: Path, allow_pickle: bool = False) -> object:
    """Load a teacher file with ``weights_only=True`` (a crafted file can never run code while it loads); numpy
    scalars and arrays (e.g. a recorded accuracy) are accepted. ``allow_pickle`` is the explicit, warned opt-in to
    unpickle arbitrary objects, for files you created yourself."""
    try:
        return safe_torch_load(path, allow_pickle=allow_pickle, what="teacher checkpoint", allow_numpy=True)
    except ValueError as err:
        if "weights-only load refuses" not in str(err):
            raise
        raise ValueError(f"{err} For a distillation teacher: set model.init_args.teacher_allow_pickle true only if "
                         "you trust the file.") from err


def extract_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The backbone state dict inside a loaded teacher file (mdistiller ``{"model": sd}``, Lightning ``.ckpt`` with
    ``backbone.*`` keys, or a plain state dict); strips a DataParallel ``module.`` prefix."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    if "model" in obj and isinstance(obj["model"], Mapping):
        sd = dict(obj["model"])
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        full = obj["state_dict"]
        sd = {k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")}
        if not sd:
            raise ValueError(f"{source} is a Lightning checkpoint without 'backbone.*' weights (keys start with "
                             f"{sorted({k.split('.')[0] for k in full})}); expected an ImageClassifier checkpoint")
    else:
        sd = dict(obj)
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{source} does not contain a state dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_teacher(name: str, path: str | Path, num_classes: int, allow_pickle: bool = False,
                 **backbone_kwargs) -> tuple[nn.Module, Path]:
    """Build ``create_backbone(name, num_classes)`` and load the teacher weights strictly.

    The file is read with ``weights_only=True``: a file that needs unpickling of other objects is refused unless
    ``allow_pickle=True`` (warns; unpickling can run code, use it only for files you trust).

    Returns:
        ``(model, resolved_file)``; the model is frozen (``requires_grad=False``) and in eval mode.

    Raises:
        FileNotFoundError: the file or folder does not exist / holds no teacher for ``name``.
        ValueError: the weights do not fit the architecture (wrong teacher, wrong number of classes), the file is
            truncated, or it holds objects a weights-only load refuses (and ``allow_pickle`` is off).
    """
    if str(path).startswith(WEIGHTS_PREFIX):  # torchvision's weights API (ImageNet teachers)
        file, sd = Path(str(path)), torchvision_state_dict(str(path))
    else:
        file = resolve_teacher_path(path, name)
        sd = extract_state_dict(_read(file, allow_pickle), str(file))
    model = create_backbone(name, num_classes, **backbone_kwargs)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label} ({len(items)}): {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if items
        )
        raise ValueError(
            f"teacher checkpoint {file} does not match the architecture {name!r} with {num_classes} classes: "
            f"{details}. Check model.teacher (and num_classes). {_how_to_get(name)}"
        )
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"teacher checkpoint {file} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s): "
                         f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. The file is corrupt or comes from a "
                         "diverged run; use another teacher checkpoint.")
    model.load_state_dict(sd, strict=True)
    model.requires_grad_(False)
    model.eval()
    return model, file


def state_hash(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes): identifies a teacher independently of the
    file format it came from."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
