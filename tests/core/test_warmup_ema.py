"""WarmupEMA's update runs on the device: no host read of the update count per parameter and step."""

from __future__ import annotations

import pytest
import torch

from lightning_methods.callbacks import WarmupEMA


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_update_reads_nothing_on_the_host(warmup):
    """torch's AveragedModel calls the average once per parameter with the count as a device tensor; reading it with
    ``float()`` would wait for the device once per parameter and step (on the meta device any host read raises)."""
    ema = WarmupEMA(0.999, warmup=warmup)
    meta = torch.empty(3, device="meta")
    out = ema._average(meta, meta, torch.tensor(7, device="meta"))
    assert out.shape == (3,) and out.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 5, 100, 10**6])
def test_ema_update_is_score_sdes_formula(dtype, k):
    decay = 0.9999
    g = torch.Generator().manual_seed(k)
    averaged, current = torch.randn(64, generator=g, dtype=dtype), torch.randn(64, generator=g, dtype=dtype)
    out = WarmupEMA(decay)._average(averaged.clone(), current, torch.tensor(k))
    d = min(decay, (1 + k) / (10 + k))
    expected = averaged.double() - (1 - d) * (averaged.double() - current.double())
    # a few roundings of the dtype on values of the size of the inputs (|a|, |c| and their difference)
    scale = float(averaged.abs().max() + current.abs().max())
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=8 * torch.finfo(dtype).eps * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ema_update_equals_the_host_arithmetic_bit_for_bit(dtype):
    """The device-side rate is score_sde's Python arithmetic in float64, so the averages are bit-identical to those
    of the host computation (runs made before the change reproduce exactly), at every step of the warm-up."""
    decay = 0.999
    g = torch.Generator().manual_seed(0)
    averaged, current = torch.randn(256, generator=g, dtype=dtype), torch.randn(256, generator=g, dtype=dtype)
    for k in [*range(1, 3000, 7), 10**6]:
        rate = 1.0 - min(decay, (1.0 + k) / (10.0 + k))
        host = averaged - rate * (averaged - current)
        assert torch.equal(WarmupEMA(decay)._average(averaged.clone(), current, torch.tensor(k)), host), k

