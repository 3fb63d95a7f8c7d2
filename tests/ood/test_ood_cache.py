"""The embedding cache: reuse, invalidation by encoder / preprocessing / images, policies, never reused for the wrong
inputs; and the encoders: timm (random init, local weights file, missing weights offline), package checkpoints,
package backbones, unknown names."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from lightning_methods import ImageClassifier
from lightning_methods.datamodules import DigitsDataModule, load_digits_uint8
from lightning_methods.ood.cache import CorruptFileError, EmbeddingCache, StaleCacheError, content_hash
from lightning_methods.ood.encoders import EncoderSpec, build_encoder, weights_fingerprint
from lightning_methods.ood.features import EmbeddingSet

from helpers import quiet_trainer

IMAGES = load_digits_uint8()[0][:8]


def _fp(spec: EncoderSpec, images=IMAGES):
    encoder, fp = build_encoder(spec, 10)
    return encoder, {"encoder": fp, "images": {"content_sha256": content_hash(images)}}


def test_cache_reuse_and_invalidation(tmp_path, one_thread):
    cache = EmbeddingCache(tmp_path)
    encoder, fp = _fp(EncoderSpec("e", backbone="resnet8", seed=0))
    with torch.no_grad():
        feats = EmbeddingSet(encoder(IMAGES)[0], torch.arange(8), torch.zeros(8, dtype=torch.long))
    assert cache.lookup("e", "set", fp) == (None, "not cached")
    cache.store("e", "set", feats, fp)
    found, reason = cache.lookup("e", "set", fp)
    assert reason == "" and torch.equal(found.features, feats.features)
    meta = json.loads((tmp_path / "e" / "set.json").read_text())
    assert meta["fingerprint"]["encoder"]["preprocess"]["input_size"] == 32 and meta["samples"] == 8
    changes = {"weights_sha256": _fp(EncoderSpec("e", backbone="resnet8", seed=1))[1],
               "preprocess.input_size": _fp(EncoderSpec("e", backbone="resnet8", seed=0, input_size=40))[1],
               "content_sha256": _fp(EncoderSpec("e", backbone="resnet8", seed=0), IMAGES.flip(0))[1]}
    for field, other in changes.items():
        found, reason = cache.lookup("e", "set", other)
        assert found is None and field in reason
    with pytest.raises(StaleCacheError, match="weights_sha256"):
        EmbeddingCache(tmp_path, "require").lookup("e", "set", changes["weights_sha256"])
    with pytest.raises(FileNotFoundError, match="require"):
        EmbeddingCache(tmp_path, "require").lookup("e", "other_set", fp)
    assert EmbeddingCache(tmp_path, "refresh").lookup("e", "set", fp)[0] is None
    # a feature file copied over (with its checksum) from another encoder is never used for this one
    cache.store("f", "set", feats, changes["weights_sha256"])
    for suffix in (".pt", ".pt.sha256"):
        (tmp_path / "e" / f"set{suffix}").write_bytes((tmp_path / "f" / f"set{suffix}").read_bytes())
    with pytest.raises(StaleCacheError, match="never reused"):
        cache.load("e", "set", fp)
    with pytest.raises(ValueError, match="policy"):
        EmbeddingCache(tmp_path, "sometimes")


def _flip_inside_tensor(path, values: torch.Tensor) -> None:
    """Flip one bit of the stored bytes of ``values`` inside the torch file (found by its byte pattern)."""
    raw = bytearray(path.read_bytes())
    pattern = values.contiguous().view(torch.uint8).numpy().tobytes()[:64]
    at = bytes(raw).find(pattern)
    assert at >= 0, "tensor bytes not found in the file"
    raw[at + 5] ^= 0x40  # an exponent bit of the second float: the value changes by orders of magnitude
    path.write_bytes(bytes(raw))


def test_corrupt_cache_entries_stop_and_refresh_recomputes(tmp_path):
    feats = EmbeddingSet(torch.linspace(-1, 1, 8 * 16).reshape(8, 16), torch.arange(8),
                         torch.zeros(8, dtype=torch.long))
    fp = {"encoder": {"name": "e"}, "images": {"content_sha256": "x"}}
    cache, path = EmbeddingCache(tmp_path), tmp_path / "e" / "set.pt"
    digest = cache.store("e", "set", feats, fp)
    assert (tmp_path / "e" / "set.pt.sha256").read_text().split()[0] == digest
    assert json.loads((tmp_path / "e" / "set.json").read_text())["sha256"] == digest
    good = path.read_bytes()
    # the flipped byte still unpickles to a valid tensor with one wrong value: only the checksum can catch it
    _flip_inside_tensor(path, feats.features)
    flipped = torch.load(path, weights_only=True)["features"]
    assert (flipped != feats.features).sum() == 1
    for policy in ("reuse", "require"):
        with pytest.raises(CorruptFileError, match=f"{path}.*corrupt.*--cache_policy refresh.*delete the file"):
            EmbeddingCache(tmp_path, policy).lookup("e", "set", fp)
    # truncated
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptFileError, match="set.pt is corrupt"):
        cache.lookup("e", "set", fp)
    # a copy without its .sha256 is checked against the digest stored inside it
    (tmp_path / "e" / "set.pt.sha256").unlink()
    path.write_bytes(good)
    assert torch.equal(cache.lookup("e", "set", fp)[0].features, feats.features)
    _flip_inside_tensor(path, feats.features)
    with pytest.raises(CorruptFileError, match="differs from the SHA-256 digest stored inside.*--cache_policy refresh"):
        cache.lookup("e", "set", fp)
    torch.save({**feats.to_dict(), "fingerprint": json.dumps(fp)}, path)  # neither checksum nor digest: not trusted
    with pytest.raises(CorruptFileError, match="no recorded checksum"):
        cache.lookup("e", "set", fp)
    # refresh never reads the entry; storing again repairs it
    assert EmbeddingCache(tmp_path, "refresh").lookup("e", "set", fp) == (None, "cache policy 'refresh'")
    assert cache.store("e", "set", feats, fp) == digest  # the same content gives the same bytes
    assert torch.equal(cache.lookup("e", "set", fp)[0].features, feats.features)
    # deleted: recomputed under "reuse", refused under "require"
    path.unlink()
    assert cache.lookup("e", "set", fp) == (None, "not cached")
    with pytest.raises(FileNotFoundError, match="require"):
        EmbeddingCache(tmp_path, "require").lookup("e", "set", fp)


def test_timm_encoder_random_init_and_local_weights_file(tmp_path, one_thread):
    encoder, fp = build_encoder(EncoderSpec("t", timm="resnet10t", pretrained=False, input_size=48, seed=3), 10)
    again, fp2 = build_encoder(EncoderSpec("t", timm="resnet10t", pretrained=False, input_size=48, seed=3), 10)
    assert fp == fp2 and fp["preprocess"]["mean"] == [0.485, 0.456, 0.406]  # timm's pretrained config
    with torch.no_grad():
        feats, logits = encoder(IMAGES)
    assert feats.shape == (8, 512) and logits is None
    weights = tmp_path / "resnet10t.pth"
    torch.save(encoder.net.state_dict(), weights)
    loaded, fp3 = build_encoder(EncoderSpec("t", timm="resnet10t", weights=str(weights), input_size=48), 10)
    assert weights_fingerprint(loaded.net) == fp["weights_sha256"] == fp3["weights_sha256"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(IMAGES)[0], feats)


def test_package_checkpoint_encoder(tmp_path, one_thread):
    dm = DigitsDataModule(batch_size=32)
    module = ImageClassifier(backbone="resnet8", num_classes=10)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "cls.ckpt"
    trainer.save_checkpoint(path)
    encoder, fp = build_encoder(EncoderSpec("c", checkpoint=str(path), mean=[0.0] * 3, std=[1.0] * 3), 10)
    module.eval()
    with torch.no_grad():
        feats, logits = encoder(IMAGES)
        x = IMAGES.float() / 255
        torch.testing.assert_close(feats, module.backbone.forward_features(x))
        torch.testing.assert_close(logits, module(x))
    assert fp["kind"] == "checkpoint" and fp["backbone"] == "resnet8" and len(fp["weights_sha256"]) == 64


def test_bad_encoders_are_named(tmp_path):
    with pytest.raises(ValueError, match="not a timm model"):
        build_encoder(EncoderSpec("x", timm="no_such_model_v9"), 10)
    with pytest.raises(ValueError, match="unknown package backbone"):
        build_encoder(EncoderSpec("x", backbone="resnet9999"), 10)
    with pytest.raises(ValueError, match="exactly one"):
        EncoderSpec("x", timm="resnet10t", backbone="resnet8")
    cached = [n for n in ("resnet10t", "vit_small_patch14_dinov2.lvd142m") if timm.is_model(n)]
    with pytest.raises(FileNotFoundError, match="weights: /path"):  # offline, not in the cache: fails at once
        build_encoder(EncoderSpec("x", timm=cached[-1], allow_download=False), 10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_encoder(EncoderSpec("x", timm="resnet10t", weights=str(tmp_path / "missing.pth")), 10)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a package ImageClassifier checkpoint"):
        build_encoder(EncoderSpec("x", checkpoint=str(tmp_path / "other.ckpt")), 10)


def test_package_backbone_encoders_give_pooled_features_also_for_vit_lite(one_thread):
    """A package backbone's encoder gives one feature vector per image: the CNNs' forward_features, and for the
    ViT-Lite backbones (whose forward_features are the tokens) the pooled features of their own head."""
    for backbone, width in (("resnet8", 64), ("vit_lite_7_4", 256)):
        encoder, _ = build_encoder(EncoderSpec("e", backbone=backbone, seed=0), 10)
        with torch.no_grad():
            feats, logits = encoder(IMAGES[:2])
            net = encoder.net
            pooled = net.forward_head(net.forward_features(encoder.prepare(IMAGES[:2])), pre_logits=True) \
                if backbone.startswith("vit") else net.forward_features(encoder.prepare(IMAGES[:2]))
        assert feats.shape == (2, width) and logits.shape == (2, 10), backbone
        torch.testing.assert_close(feats, pooled, rtol=0, atol=0)

