"""The ViT-Lite backbones and attention extraction: configuration, CCT init, the recorded attention equals what the
fused forward computes, fused == explicit, any timm ViT, and clear errors for bad input."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.eva import Eva
from torch import nn

from lightning_methods.analysis.attention import attention_locality
from lightning_methods.analysis.attention_extract import AttentionRecorder, attention_modules, eager
from lightning_methods.models import create_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("vit_lite_7_4", 10, **{"embed_dim": 32, "depth": 2, "num_heads": 2, **kw})


def test_vit_lite_7_4_has_the_spec_configuration():
    with torch.device("meta"):
        m = create_backbone("vit_lite_7_4", 100)
    assert m.patch_embed.grid_size == (8, 8) and m.patch_embed.patch_size == (4, 4) and m.num_prefix_tokens == 1
    assert m.embed_dim == 256 and len(m.blocks) == 7 and m.global_pool == "token" and m.pos_embed.shape == (1, 65, 256)
    assert all(b.attn.num_heads == 4 and b.mlp.fc1.out_features == 512 for b in m.blocks)
    assert all(b.attn.qkv.bias is None for b in m.blocks)  # as CCT's ViT-Lite
    assert sum(p.numel() for p in m.parameters()) == 3_740_004
    # a plain timm model: every linear layer is a standard nn.Linear (what the multi-bit conversion replaces)
    assert {type(x) for x in m.modules() if isinstance(x, nn.Linear)} == {nn.Linear}
    assert all(b.attn.fused_attn == timm.layers.use_fused_attn() for b in m.blocks)
    with torch.device("meta"):
        t = create_backbone("vit_lite_7_8", 200)
    assert t.patch_embed.img_size == (64, 64) and t.patch_embed.grid_size == (8, 8) and t.head.out_features == 200


@torch.no_grad()
def test_cct_initialisation():
    torch.manual_seed(0)
    m = create_backbone("vit_lite_7_4", 100)
    assert m.pos_embed.std().item() == pytest.approx(0.2, rel=0.05)  # CCT: trunc-normal(std 0.2), timm: 0.02
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert float(m.cls_token.abs().max()) == 0.0 and float(m.head.bias.abs().max()) == 0.0
    fan_in = 3 * 4 * 4
    assert m.patch_embed.proj.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.1)  # Kaiming normal
    torch.manual_seed(0)
    assert create_backbone("vit_lite_7_4", 100, init="timm").pos_embed.std().item() < 0.03


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="not divisible by patch_size 5"):
        create_backbone("vit_lite_7_4", 10, patch_size=5)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        attention_locality(tiny_vit(dynamic_img_size=True), torch.randn(2, 3, 30, 30))
    with pytest.raises(ValueError, match="expects 32x32"):
        attention_locality(tiny_vit(), torch.randn(2, 3, 64, 64))


def test_models_without_attention_are_refused():
    with pytest.raises(ValueError, match="no attention layers"):
        attention_locality(create_backbone("resnet8", 10), torch.randn(2, 3, 32, 32))


def test_recorded_attention_times_v_equals_the_fused_attention_output():
    """Same forward, fused kernel: softmax(q k^T / sqrt(d)) recomputed from the hooks, times V, equals what
    scaled_dot_product_attention produced (the input of the output projection)."""
    m = tiny_vit().eval()
    for b in m.blocks:
        b.attn.fused_attn = True
    x = torch.randn(3, 3, 32, 32)
    seen: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for i, b in enumerate(m.blocks):
        seen[i] = {}
        handles.append(b.attn.qkv.register_forward_hook(lambda mod, a, out, i=i: seen[i].update(qkv=out)))
        handles.append(b.attn.proj.register_forward_pre_hook(lambda mod, a, i=i: seen[i].update(out=a[0])))
    with torch.no_grad(), AttentionRecorder(m, "recompute") as rec:
        m(x)
    for h in handles:
        h.remove()
    for i, attn in enumerate(rec.maps):
        assert attn.shape == (3, 2, 65, 65)
        torch.testing.assert_close(attn.sum(-1), torch.ones(3, 2, 65))
        v = seen[i]["qkv"].reshape(3, 65, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
        out = (attn @ v).transpose(1, 2).reshape(3, 65, 32)
        torch.testing.assert_close(out, seen[i]["out"], rtol=1e-5, atol=1e-6)
    assert all(b.attn.fused_attn for b in m.blocks)


def test_fused_and_explicit_paths_agree_and_leave_no_trace():
    m = tiny_vit().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fused = m(x)
        with AttentionRecorder(m, "explicit") as rec:
            explicit_logits = m(x)
            assert not any(b.attn.fused_attn for b in m.blocks)
            explicit = [a.clone() for a in rec.maps]
        with AttentionRecorder(m, "recompute") as rec:
            recompute_logits = m(x)
            recomputed = [a.clone() for a in rec.maps]
    torch.testing.assert_close(explicit_logits, fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recompute_logits, fused, rtol=0, atol=0)  # the recompute path keeps the fused forward
    for a, b in zip(explicit, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(b.attn.fused_attn for b in m.blocks)
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())


def test_any_timm_vit_works():
    x = torch.randn(2, 3, 32, 32)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, num_classes=10,
                             depth=2, pretrained=False)
    res = attention_locality(deit, x)  # CLS + distillation token
    assert res["num_prefix_tokens"] == 2 and res["mad"].shape == (2, 2, 3) and res["grid"] == (8, 8)
    reg = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1,
                                                           num_heads=2, reg_tokens=4, num_classes=5)
    res = attention_locality(reg, x, keep_maps=1)
    assert res["num_prefix_tokens"] == 5 and res["grid"] == (4, 4) and res["maps"].shape == (1, 1, 2, 16, 16)
    # EVA applies rotary embeddings after q_norm/k_norm: "auto" must take the explicit path, which differs from a
    # naive recompute
    torch.manual_seed(0)
    eva = Eva(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, use_rot_pos_emb=True, num_classes=10)
    auto, explicit = attention_locality(eva, x), attention_locality(eva, x, method="explicit")
    naive = attention_locality(eva, x, method="recompute")
    torch.testing.assert_close(auto["mad"], explicit["mad"], rtol=0, atol=0)
    assert (auto["mad"] - naive["mad"]).abs().max() > 1e-5
    assert len(attention_modules(eva)) == 2


def test_batch_size_and_order_invariance():
    m = tiny_vit()
    x = torch.randn(7, 3, 32, 32)
    ref = attention_locality(m, x, batch_size=7)
    for bs in (1, 3):
        res = attention_locality(m, x, batch_size=bs)
        torch.testing.assert_close(res["mad"], ref["mad"], rtol=0, atol=1e-10)
        torch.testing.assert_close(res["entropy"], ref["entropy"], rtol=0, atol=1e-10)
    perm = torch.randperm(7)
    shuffled = attention_locality(m, x[perm], batch_size=4)
    torch.testing.assert_close(shuffled["mad"], ref["mad"][perm], rtol=0, atol=1e-10)
    torch.testing.assert_close(shuffled["mad"].mean(0), ref["mad"].mean(0), rtol=0, atol=1e-12)


def test_probe_restores_modes_and_bypasses_compilation():
    m = tiny_vit()
    m.train()
    m.blocks[1].eval()  # a module a user keeps in eval on purpose
    flags = [mod.training for mod in m.modules()]
    attention_locality(m, torch.randn(2, 3, 32, 32))
    assert [mod.training for mod in m.modules()] == flags

    def compiled(*args, **kwargs):
        raise AssertionError("the probe ran the compiled training graph")

    m._compiled_call_impl = compiled  # what nn.Module.compile() installs
    assert eager(m) == m._call_impl
    attention_locality(m, torch.randn(2, 3, 32, 32))  # runs the eager module
