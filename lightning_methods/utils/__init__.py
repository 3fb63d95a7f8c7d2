"""Small shared helpers used across method families: distributed reductions and gathers (:mod:`.distributed`),
seed mixing (:mod:`.seeding`) and crash-safe, code-free file I/O (:mod:`.io`).

One helper per idea: search here before writing another copy in a family.
"""

from lightning_methods._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lightning_methods.utils.distributed": (
            "all_reduce_flat", "barrier", "broadcast_object", "broadcast_tensors_", "gather_by_index", "gather_columns",
            "get_rank",
            "get_world_size", "is_distributed", "leave_process_group", "sharded_loader",
        ),
        "lightning_methods.utils.io": (
            "atomic_save_numpy", "atomic_torch_save", "atomic_write_json", "atomic_write_text", "safe_torch_load",
            "sha256_file",
        ),
        "lightning_methods.utils.seeding": ("mix_seed", "seeded_generator"),
    },
)
