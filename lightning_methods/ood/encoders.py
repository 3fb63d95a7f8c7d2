"""Frozen encoders for EncMin2L (arXiv 2605.20502): any timm model, a package checkpoint (an ImageClassifier trained
with ``lightning-methods fit``) or a package backbone, with the preprocessing that turns uint8 images into its input.

:class:`EncoderSpec` is the config entry; :func:`build_encoder` returns an :class:`Encoder` (``features(x)``: pooled
embeddings; ``logits(x)``: classifier outputs when ``with_logits``) and the fingerprint of its weights (SHA-256 over the
state dict), which keys the embedding cache together with the preprocessing.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_methods.models import available_backbones, create_backbone
from lightning_methods.utils import safe_torch_load


@dataclass
class EncoderSpec:
    """One encoder of the pipeline (exactly one of ``timm``, ``checkpoint``, ``backbone``).

    Attributes:
        name: short name used in tables, the cache and the run directory.
        timm: a timm model name (``vit_small_patch14_dinov2.lvd142m``, ``vit_base_patch16_clip_224.openai``, ...).
        checkpoint: a Lightning checkpoint of a package ImageClassifier (its ``backbone``).
        backbone: a package backbone name (randomly initialised from ``seed`` unless ``weights`` is given).
        weights: local weights file: for timm the pretrained file (``.safetensors`` / ``.pth``) used instead of the
            hub; for ``backbone`` a state dict.
        pretrained: timm: load pretrained weights (from ``weights``, the local cache or the hub).
        allow_download: timm: allow downloads from the hub; ``False`` fails at once when the weights are not cached.
        timm_kwargs: extra ``timm.create_model`` arguments (e.g. ``img_size: 224``).
        num_classes: classifier size of a ``backbone`` encoder (default: the ID classes).
        input_size: side of the encoder input (default: timm's pretrained config, else 32).
        mean: normalisation mean (default: timm's config, else the ID DataModule's).
        std: normalisation std (default: as ``mean``).
        interpolation: resize mode (default: timm's config, else bilinear).
        with_logits: also store classifier logits (MSP / energy baselines, conditional RDM); default: on for
            package checkpoints and backbones, off for timm (ImageNet logits are not ID-class logits).
        seed: initialisation seed of a randomly initialised encoder.
        train: optional training of a ``backbone`` encoder on the RDM training split before embedding (keys
            ``max_epochs``, ``lr``, ``batch_size``, ``weight_decay``); never on calibration or test data.
    """

    name: str
    timm: str | None = None
    checkpoint: str | None = None
    backbone: str | None = None
    weights: str | None = None
    pretrained: bool = True
    allow_download: bool = True
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    input_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    with_logits: bool | None = None
    seed: int = 0
    train: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        kinds = [k for k in ("timm", "checkpoint", "backbone") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(f"encoder {self.name!r}: set exactly one of timm, checkpoint, backbone (got {kinds})")
        if self.train is not None and not self.backbone:
            raise ValueError(f"encoder {self.name!r}: 'train' is only for package backbones")

    @property
    def kind(self) -> str:
        return "timm" if self.timm else "checkpoint" if self.checkpoint else "backbone"


class Encoder(nn.Module):
    """A frozen network plus its preprocessing of uint8 images.

    Args:
        net: the network.
        features_fn: ``net, x -> pooled features``.
        logits_fn: ``net, x -> logits`` (``None`` when not a classifier of the ID classes).
        preprocess: ``{"input_size", "mean", "std", "interpolation"}``.
    """

    def __init__(self, net: nn.Module, features_fn: Any, logits_fn: Any, preprocess: dict[str, Any]) -> None:
        super().__init__()
        self.net, self.features_fn, self.logits_fn, self.preprocess = net, features_fn, logits_fn, preprocess
        self.register_buffer("mean", torch.tensor(preprocess["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["std"]).view(1, -1, 1, 1), persistent=False)
        self.net.eval().requires_grad_(False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> the network input (resized, normalised float)."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        size = self.preprocess["input_size"]
        if x.shape[-2:] != (size, size):
            mode = self.preprocess["interpolation"]
            kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
            x = F.interpolate(x, size=(size, size), mode=mode, **kwargs)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(features, logits or None)`` of uint8 images."""
        x = self.prepare(images)
        feats = self.features_fn(self.net, x)
        logits = self.logits_fn(self.net, x) if self.logits_fn is not None else None
        return feats, logits


def weights_fingerprint(net: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of a state dict (any change of weights changes it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        shape, t = tuple(tensor.shape), tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{shape}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _timm_net(spec: EncoderSpec) -> nn.Module:
    import timm

    if not timm.is_model(spec.timm):
        raise ValueError(f"encoder {spec.name!r}: {spec.timm!r} is not a timm model name (see timm.list_models()); "
                         f"package backbones go in 'backbone:' ({', '.join(available_backbones())})")
    kwargs = dict(spec.timm_kwargs)
    if spec.weights:
        if not Path(spec.weights).expanduser().is_file():
            raise FileNotFoundError(f"encoder {spec.name!r}: weights file {spec.weights} does not exist")
        kwargs["pretrained_cfg_overlay"] = {"file": str(Path(spec.weights).expanduser())}
        return timm.create_model(spec.timm, pretrained=True, **kwargs)
    if not spec.pretrained:
        return timm.create_model(spec.timm, pretrained=False, **kwargs)
    if not spec.allow_download and not _timm_cached(spec.timm):
        raise FileNotFoundError(_missing_weights(spec, "they are not in the local cache and allow_download=False"))
    try:
        return timm.create_model(spec.timm, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:  # hub errors (offline), missing files
        raise FileNotFoundError(_missing_weights(spec, f"loading failed ({type(err).__name__}: {err})")) from err


def _timm_cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str)
               for f in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"))


def _missing_weights(spec: EncoderSpec, reason: str) -> str:
    return (f"encoder {spec.name!r}: pretrained weights of timm model {spec.timm!r} are not available: {reason}. "
            "Offline, download them once on a machine with internet (they land in the Hugging Face cache) or put "
            "the weights file on this machine and set 'weights: /path/to/model.safetensors' for this encoder.")


def _checkpoint_net(spec: EncoderSpec) -> tuple[nn.Module, str]:
    ckpt = safe_torch_load(Path(spec.checkpoint).expanduser(), what=f"checkpoint of encoder {spec.name!r}")
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not isinstance(hp.get("backbone"), str):
        raise ValueError(f"{spec.checkpoint} is not a package ImageClassifier checkpoint (needs 'state_dict' and a "
                         "backbone name in 'hyper_parameters'); train one with 'lightning-methods fit'")
    num_classes = int(hp.get("num_classes", 100))
    net = create_backbone(hp["backbone"], num_classes, **(hp.get("backbone_kwargs") or {}))
    weights = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{spec.checkpoint}: backbone {hp['backbone']!r} does not match the stored weights "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return net, hp["backbone"]


def _backbone_net(spec: EncoderSpec, num_classes: int) -> nn.Module:
    if spec.backbone.lower() not in available_backbones():
        raise ValueError(f"encoder {spec.name!r}: unknown package backbone {spec.backbone!r}; known: "
                         f"{', '.join(available_backbones())} (timm models go in 'timm:')")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = create_backbone(spec.backbone, spec.num_classes or num_classes)
    if spec.weights:
        state = safe_torch_load(Path(spec.weights).expanduser(), what=f"weights of encoder {spec.name!r}")
        net.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return net


def build_encoder(spec: EncoderSpec, num_classes: int, id_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                  id_std: tuple[float, ...] = (0.25, 0.25, 0.25)) -> tuple[Encoder, dict[str, Any]]:
    """Build the frozen encoder of ``spec``; returns it with its fingerprint (spec, weights hash, preprocessing).

    Args:
        spec: the encoder entry.
        num_classes: ID classes (size of a random backbone's classifier).
        id_mean: the ID DataModule's normalisation (default for package networks).
        id_std: the ID DataModule's normalisation std.

    Raises:
        ValueError: an unknown model name, a checkpoint that is not a package classifier.
        FileNotFoundError: missing checkpoint / weights files, or pretrained weights unavailable offline.
    """
    if spec.kind == "timm":
        import timm

        with torch.random.fork_rng(devices=[]):  # random parts (a randomly initialised encoder) from spec.seed
            torch.manual_seed(spec.seed)
            net = _timm_net(spec)
        cfg = timm.data.resolve_data_config({}, model=net)
        default = {"input_size": int(cfg["input_size"][-1]), "mean": list(cfg["mean"]), "std": list(cfg["std"]),
                   "interpolation": cfg.get("interpolation", "bicubic")}
        features_fn = _timm_features
        logits_fn = _forward if spec.with_logits else None
        source = {"timm": spec.timm}
    else:
        if spec.kind == "checkpoint":
            net, name = _checkpoint_net(spec)
            source = {"backbone": name}
        else:
            net = _backbone_net(spec, num_classes)
            source = {"backbone": spec.backbone}
        default = {"input_size": 32, "mean": list(id_mean), "std": list(id_std), "interpolation": "bilinear"}
        features_fn = _package_features
        logits_fn = None if spec.with_logits is False else _forward
    preprocess = {"input_size": int(spec.input_size or default["input_size"]),
                  "mean": [float(v) for v in (spec.mean or default["mean"])],
                  "std": [float(v) for v in (spec.std or default["std"])],
                  "interpolation": spec.interpolation or default["interpolation"]}
    if preprocess["interpolation"] not in ("bilinear", "bicubic", "nearest"):
        preprocess["interpolation"] = "bicubic"
    encoder = Encoder(net, features_fn, logits_fn, preprocess)
    fingerprint = {"name": spec.name, "kind": spec.kind, **source, "weights_sha256": weights_fingerprint(net),
                   "preprocess": preprocess, "logits": logits_fn is not None,
                   "timm_kwargs": spec.timm_kwargs if spec.kind == "timm" else {}}
    return encoder, fingerprint


def _timm_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.forward_head(net.forward_features(x), pre_logits=True)


def _package_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features of a package backbone: ``forward_features``, except for the ViT-Lite backbones (timm
    ``VisionTransformer``), whose ``forward_features`` is the token sequence: pooled by their own head."""
    features = net.forward_features(x)
    if features.ndim > 2 and hasattr(net, "forward_head"):
        return net.forward_head(features, pre_logits=True)
    return features


def _forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x)


def spec_dict(spec: EncoderSpec) -> dict[str, Any]:
    """The spec as a plain dict (for run fingerprints)."""
    return asdict(spec)
