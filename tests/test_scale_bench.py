"""bench/scale.py's pure parts: the parameter count of a shape, the targets, the fit (no model is built)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import scale  # noqa: E402


def test_shape_params_match_the_random_3b_checkpoint():
    rest, layer = scale.shape_params(*scale.KNOWN["Llama-3.2-3B"])
    # what params_of read from the safetensors headers of make_random("3b")
    assert (rest, layer) == (394005504, 100669440)
    assert rest + 28 * layer == 3212749824


def test_targets_and_fit():
    row = {"mode": "stream", "peak_rss_mib": 1024.0, "model_bytes": 4 * 2**30, "stream_target": 2**30}
    assert scale.target_of(row)[1] is True
    assert scale.target_of({**row, "peak_rss_mib": 1025.0})[1] is False
    assert scale.target_of({**row, "mode": "memory", "peak_rss_mib": 1.3 * 4 * 1024 + 1})[1] is False
    base = {"size": "-", "mode": "baseline", "peak_rss_mib": 256.0}
    rows = [base] + [{"size": s, "mode": "memory", "params": n, "rest_params": n // 4, "layer_params": n // 8,
                      "layers": 6, "model_bytes": 2 * n, "peak_rss_mib": 256 + 3 * 2 * n / 2**20, "seconds": n / 1e7,
                      "load_average": [1.0]} for s, n in (("a", 10**8), ("b", 10**9))]
    fit = scale.fits(rows)["memory"]
    assert abs(fit["b"] - 3.0) < 1e-9 and abs(fit["c"] - 1e-7) < 1e-15


def test_targets_are_checked_above_the_imports_baseline():
    row = {"mode": "stream", "peak_rss_mib": 1024.0 + 300, "imports_rss_mib": 300.0, "model_bytes": 4 * 2**30,
           "stream_target": 2**30}
    assert scale.target_of(row)[1] is True
    assert scale.target_of({**row, "imports_rss_mib": 299.0})[1] is False
    full = {**row, "size": "x", "params": 2 * 10**9, "dtype": "bfloat16", "seconds": 10.0, "load_average": [1.0],
            "score_peak_rss_mib": 1024.0 + 400}
    line = scale.table([full]).splitlines()[-1]
    cells = [c.strip() for c in line.split("|")[1:-1]]
    # process peak, after imports, above imports, scoring above imports, above / model, target, met
    assert cells[6:13] == ["1.29", "0.29", "1.00", "1.10", "0.25", "≤ 1.00 (3 layers + embeddings)", "yes"]
    assert "scoring alone misses the target" in cells[13]
