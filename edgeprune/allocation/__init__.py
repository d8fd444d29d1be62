"""Allocators: per-layer removal counts under a global budget of decoder parameters. Each is a small class with
capability flags (what it reads: scores, block statistics, sensitivities), registered by name in ``ALLOCATORS``
as the scorers are in ``edgeprune.scoring``. Importing this package does not import torch."""

from edgeprune.allocation import layerwise, uniform  # noqa: F401  (registers the allocators)
from edgeprune.allocation.base import (
    ALLOCATORS,
    Allocation,
    Allocator,
    LayerAllocation,
    UnitCosts,
    check_ratio,
    unit_costs,
)
from edgeprune.errors import EdgePruneError


def make_allocator(name: str, **options) -> Allocator:
    if name not in ALLOCATORS:
        raise EdgePruneError(f"unknown allocator '{name}'; choose from {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name](**options)


def allocate(name: str, adapter, ratio: float, *, scores=None, sensitivities=None, attn_unit: str = "group",
             round_to: int = 1, **options) -> Allocation:
    """One allocation with allocator ``name`` built from ``options`` (LSPS: tau, min_ratio, max_ratio)."""
    return make_allocator(name, **options).allocate(adapter, ratio, scores=scores, sensitivities=sensitivities,
                                                    attn_unit=attn_unit, round_to=round_to)


__all__ = ["ALLOCATORS", "Allocation", "Allocator", "LayerAllocation", "UnitCosts", "allocate", "check_ratio",
           "make_allocator", "unit_costs"]
