"""Small shared helpers used across method families: distributed reductions and gathers (:mod:`.distributed`),
seed mixing (:mod:`.seeding`) and crash-safe, code-free file I/O (:mod:`.io`).

One helper per idea: search here before writing another copy in a family.
"""

from .distributed import (
    all_reduce_flat,
    barrier,
    broadcast_object,
    broadcast_tensors_,
    gather_by_index,
    get_rank,
    get_world_size,
    is_distributed,
    sharded_loader,
)
from .io import atomic_save_numpy, atomic_torch_save, atomic_write_json, atomic_write_text, safe_torch_load, sha256_file
from .seeding import mix_seed, seeded_generator

__all__ = [
    "all_reduce_flat",
    "atomic_save_numpy",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "barrier",
    "broadcast_object",
    "broadcast_tensors_",
    "gather_by_index",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "mix_seed",
    "safe_torch_load",
    "seeded_generator",
    "sha256_file",
    "sharded_loader",
]
