"""Process-group helpers: leaving a group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from lightning_methods.utils import leave_process_group

from helpers import free_port, run_ddp


def test_leave_without_a_group_does_nothing():
    assert not dist.is_initialized()
    leave_process_group()
    assert not dist.is_initialized()


def test_leave_a_one_rank_group(monkeypatch):
    monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
    monkeypatch.setitem(os.environ, "MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    leave_process_group()
    assert not dist.is_initialized()


def _collective_then_leave(rank: int, world_size: int) -> tuple[bool, float]:
    dist.init_process_group("gloo")
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    leave_process_group()  # right after a collective: the case that could hang
    return dist.is_initialized(), total.item()


def test_two_ranks_leave_together():
    assert run_ddp(_collective_then_leave) == [(False, 3.0), (False, 3.0)]
