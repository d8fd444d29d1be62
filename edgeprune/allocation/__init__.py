"""Allocators: per-layer removal counts under a global budget."""

from edgeprune.allocation.base import Allocation, LayerAllocation, UnitCosts, unit_costs
from edgeprune.errors import EdgePruneError

ALLOCATORS = ("uniform",)


def allocate(name: str, adapter, ratio: float, **options) -> Allocation:
    if name == "uniform":
        from edgeprune.allocation.uniform import allocate_uniform

        return allocate_uniform(adapter, ratio, **options)
    raise EdgePruneError(f"unknown allocator '{name}'; choose from {', '.join(ALLOCATORS)}")


__all__ = ["ALLOCATORS", "Allocation", "LayerAllocation", "UnitCosts", "allocate", "unit_costs"]
