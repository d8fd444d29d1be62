import pytest

from edgeprune.allocation import allocate, unit_costs
from edgeprune.errors import EdgePruneError
from edgeprune.models.info import param_counts


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.4])
@pytest.mark.parametrize("attn_unit", ["group", "head"])
def test_uniform_meets_each_layers_budget_within_one_channel(tiny, ratio, attn_unit):
    alloc = allocate("uniform", tiny.adapter, ratio, attn_unit=attn_unit)
    for c, la in zip(unit_costs(tiny.adapter, attn_unit), alloc.layers, strict=True):
        removed = la.attn_units * c.attn_unit_params + la.channels * c.channel_params
        assert abs(removed - ratio * c.prunable) <= c.channel_params / 2 + 1
        assert la.attn_units < c.attn_units and la.channels < c.channels


def test_unit_costs_match_parameter_counts(tiny):
    costs = unit_costs(tiny.adapter, "group")
    p = param_counts(tiny.adapter)
    assert sum(c.prunable for c in costs) == p["attention"] + p["mlp"]


def test_round_to_gives_multiples(tiny):
    alloc = allocate("uniform", tiny.adapter, 0.3, round_to=32)
    assert all((128 - la.channels) % 32 == 0 for la in alloc.layers)


def test_bad_ratios(tiny):
    for r in (-0.1, 1.0, 1.5):
        with pytest.raises(EdgePruneError, match="ratio"):
            allocate("uniform", tiny.adapter, r)
    with pytest.raises(EdgePruneError, match="every MLP channel"):
        allocate("uniform", tiny.adapter, 0.99)
    with pytest.raises(EdgePruneError, match="unknown allocator"):
        allocate("nope", tiny.adapter, 0.2)
