"""``edgeprune fit``: find the least compression (pruning ratio and dtype together) predicted to meet a device's
memory, speed, size and quality targets, then prune, export, evaluate and profile it on the device.

``shapes`` (sizes without weights), ``memory`` (the profiler's memory check on a predicted artifact),
``latency`` + ``synthetic`` (the per-device latency table and model), ``search`` (the choice), ``measure``
(prune, export, PPL and measured values of one configuration), ``run`` (the command; `edgeprune run`'s ``[fit]``
section runs it as a stage, edgeprune/pipeline/fit_stages.py). Importing this package imports no torch; pruning
and exporting (``measure``) do.
"""
