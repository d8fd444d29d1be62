"""Allocators: per-layer removal counts under a global budget of decoder parameters."""

from edgeprune.allocation.base import Allocation, LayerAllocation, UnitCosts, unit_costs
from edgeprune.errors import EdgePruneError

ALLOCATORS = ("uniform", "lsps", "global", "owl", "depth")


def allocate(name: str, adapter, ratio: float, *, scores=None, sensitivities=None, attn_unit: str = "group",
             round_to: int = 1, **options) -> Allocation:
    if name == "uniform":
        from edgeprune.allocation.uniform import allocate_uniform

        return allocate_uniform(adapter, ratio, attn_unit=attn_unit, round_to=round_to)
    from edgeprune.allocation import layerwise as lw

    if name == "lsps":
        if sensitivities is None:
            raise EdgePruneError("the lsps allocator needs layer sensitivities")
        return lw.allocate_lsps(adapter, ratio, sensitivities, attn_unit, round_to, **options)
    if name == "global":
        return lw.allocate_global(adapter, ratio, scores, attn_unit, round_to)
    if name == "owl":
        return lw.allocate_owl(adapter, ratio, scores, attn_unit, round_to)
    if name == "depth":
        return lw.allocate_depth(adapter, ratio, scores)
    raise EdgePruneError(f"unknown allocator '{name}'; choose from {', '.join(ALLOCATORS)}")


__all__ = ["ALLOCATORS", "Allocation", "LayerAllocation", "UnitCosts", "allocate", "unit_costs"]
