"""Reading the softmax attention probabilities of timm vision transformers without changing how they train.

timm's attention modules use fused ``scaled_dot_product_attention``, which never materialises the probabilities.
:class:`AttentionRecorder` obtains them in one of two ways, both only while it is active:

- ``"recompute"``: forward hooks on ``q_norm`` / ``k_norm`` capture the queries and keys the fused kernel receives
  and recompute ``softmax(q k^T * scale)``; the forward itself stays fused and the module is not touched. Exact for
  timm's standard ``Attention`` (no attention bias, no rotary embedding).
- ``"explicit"``: switches ``fused_attn`` off and reads the probabilities at the input of ``attn_drop``; restores
  the flag on exit. Works for any timm attention with that structure (EVA with rotary embeddings, BEiT with a
  relative-position bias, ...).

``"auto"`` (default) recomputes for timm's standard ``Attention`` and runs the explicit path for the others.
Training never sees either: the recorder is a context manager used by the probe only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

Method = Literal["auto", "recompute", "explicit"]


def _standard_attention() -> type | None:
    try:
        from timm.layers import Attention
    except ImportError:  # pragma: no cover - timm is a core dependency
        return None
    return Attention


def is_attention_module(module: nn.Module) -> bool:
    """True for timm attention modules whose probabilities the recorder can read (``num_heads`` plus either the
    q/k-norm hooks of the standard ``Attention`` or a ``fused_attn`` switch with an ``attn_drop`` module)."""
    if not hasattr(module, "num_heads"):
        return False
    standard = _standard_attention()
    if standard is not None and isinstance(module, standard):
        return True
    return hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules of ``model`` in forward (registration) order.

    Raises:
        ValueError: if the model has none (e.g. a CNN), naming the model class.
    """
    found = [(name, m) for name, m in model.named_modules() if is_attention_module(m)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention layers the locality probe can read: it needs timm attention "
            "modules (timm.layers.Attention or modules with `fused_attn`, `attn_drop` and `num_heads`), as in "
            "timm's VisionTransformer / DeiT / EVA / BEiT or the package's vit_lite_7_4. A CNN has no attention maps."
        )
    return found


def _uses_recompute(module: nn.Module, method: str) -> bool:
    if method == "explicit":
        return False
    standard = _standard_attention()
    exact = standard is not None and type(module) is standard
    if method == "recompute" and not (exact or (hasattr(module, "q_norm") and hasattr(module, "k_norm"))):
        raise ValueError(f"{type(module).__name__} has no q_norm/k_norm modules to hook; use method='explicit'")
    return method == "recompute" or exact


def eager(model: nn.Module) -> Callable[..., Any]:
    """Call ``model`` without its compiled wrapper (``nn.Module.compile`` or ``torch.compile``), so a probe never
    triggers a recompilation of the training graph."""
    model = getattr(model, "_orig_mod", model)
    if getattr(model, "_compiled_call_impl", None) is not None:
        return model._call_impl
    return model


class AttentionRecorder:
    """Context manager that records the attention probabilities of every attention layer of ``model``.

    After each forward inside the context, ``maps[l]`` holds layer ``l``'s probabilities (B, heads, T, T) in float32,
    detached. Hooks (and, on the explicit path, the ``fused_attn`` flags) are removed/restored on exit.

    Args:
        model: a module containing timm attention layers (see :func:`attention_modules`).
        method: ``"auto"``, ``"recompute"`` or ``"explicit"`` (module docstring).
        layers: indices (into :func:`attention_modules`) to record; default all.

    Raises:
        ValueError: unknown ``method``, or a model without attention layers.
    """

    def __init__(self, model: nn.Module, method: Method = "auto", layers: Sequence[int] | None = None) -> None:
        if method not in ("auto", "recompute", "explicit"):
            raise ValueError(f"method must be 'auto', 'recompute' or 'explicit', got {method!r}")
        modules = attention_modules(model)
        self.names = [n for n, _ in modules]
        self.modules = [m for _, m in modules]
        self.layers = list(range(len(self.modules))) if layers is None else list(layers)
        self.method = method
        self.maps: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list[Any] = []
        self._fused: dict[int, bool] = {}

    @property
    def num_layers(self) -> int:
        return len(self.modules)

    def clear(self) -> None:
        self.maps = [None] * len(self.modules)

    def _store(self, layer: int) -> Callable[[torch.Tensor], None]:
        def store(attn: torch.Tensor) -> None:
            self.maps[layer] = attn.detach().float()
        return store

    def __enter__(self) -> AttentionRecorder:
        for layer in self.layers:
            module = self.modules[layer]
            store = self._store(layer)
            if _uses_recompute(module, self.method):
                self._hook_qk(module, store)
            else:
                self._fused[layer] = bool(module.fused_attn)
                module.fused_attn = False
                self._handles.append(module.attn_drop.register_forward_pre_hook(
                    lambda mod, args, store=store: store(args[0])))
        return self

    def _hook_qk(self, module: nn.Module, store: Callable[[torch.Tensor], None]) -> None:
        box: dict[str, torch.Tensor] = {}
        scale = getattr(module, "scale", None)  # some timm releases give EvaAttention a scale but no head_dim
        scale = float(module.head_dim ** -0.5 if scale is None else scale)

        def on_q(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            box["q"] = out

        def on_k(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            q = box.pop("q")
            logits = (q.float() * scale) @ out.float().transpose(-2, -1)
            store(logits.softmax(dim=-1))

        self._handles.append(module.q_norm.register_forward_hook(on_q))
        self._handles.append(module.k_norm.register_forward_hook(on_k))

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer, flag in self._fused.items():
            self.modules[layer].fused_attn = flag
        self._fused.clear()


def vit_geometry(model: nn.Module, image_size: Sequence[int], grid_size: Sequence[int] | int | None = None,
                 num_prefix_tokens: int | None = None, patch_size: Sequence[int] | int | None = None
                 ) -> tuple[tuple[int, int], int, tuple[int, int]]:
    """Token grid, number of prefix tokens and patch size of a ViT for images of ``image_size`` (H, W).

    Read from timm's ``patch_embed.patch_size`` and ``num_prefix_tokens`` when not given.

    Raises:
        ValueError: if the geometry cannot be read (pass it explicitly), if the image size is not divisible by the
            patch size, or if it differs from the model's fixed input size.
    """
    h, w = (int(s) for s in image_size)
    embed = getattr(model, "patch_embed", None)
    if patch_size is None and embed is not None and hasattr(embed, "patch_size"):
        patch_size = embed.patch_size
    if num_prefix_tokens is None:
        num_prefix_tokens = getattr(model, "num_prefix_tokens", None)
    if patch_size is None or num_prefix_tokens is None:
        raise ValueError(f"cannot read the patch size / number of prefix tokens of {type(model).__name__}: pass "
                         "patch_size and num_prefix_tokens (and grid_size) to the locality probe")
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else (int(p) for p in patch_size)
    if h % ph or w % pw:
        raise ValueError(f"probe images of size {h}x{w} are not divisible by the patch size {ph}x{pw}: use images "
                         f"whose sides are multiples of the patch size (e.g. 32x32 with patch 4, 64x64 with patch 8)")
    fixed = getattr(embed, "img_size", None)
    dynamic = getattr(model, "dynamic_img_size", False) or getattr(embed, "dynamic_img_pad", False)
    if fixed is not None and not dynamic and tuple(fixed) != (h, w):
        raise ValueError(f"probe images are {h}x{w} but {type(model).__name__} expects {fixed[0]}x{fixed[1]} inputs: "
                         "probe with images of the training size (or build the model with dynamic_img_size=True)")
    grid = (h // ph, w // pw) if grid_size is None else grid_size
    grid = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    return grid, int(num_prefix_tokens), (ph, pw)
