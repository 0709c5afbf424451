"""The step profiler's account of GPU idle time (benchmarks/profile_step.py), on a made-up kernel timeline."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from profile_step import launch_gaps  # noqa: E402


def test_launch_gaps_counts_idle_time_between_kernels_by_size():
    # two steps; times in µs, out of order as a profiler may list them; "c" runs on another stream inside "b"
    kernels = [(10.0, 21.0, "b"), (0.0, 9.5, "a"), (15.0, 20.0, "c"), (24.0, 30.0, "d"), (180.0, 190.0, "e"),
               (191.5, 200.0, "f")]
    gaps = launch_gaps(kernels, steps=2, largest=2)
    assert gaps["launches_per_step"] == 3
    # a -> b 0.5 µs, c inside b (none), b -> d 3 µs (not c -> d: b still ran), d -> e 150 µs, e -> f 1.5 µs
    assert gaps["idle_ms_per_step"] == pytest.approx((0.5 + 3 + 150 + 1.5) / 1000 / 2)
    by_size = gaps["by_size"]
    assert {size: b["gaps"] * 2 for size, b in by_size.items() if b["gaps"]} == {
        "<1 us": 1, "1-2 us": 1, "2-4 us": 1, ">=100 us": 1}
    assert by_size[">=100 us"]["ms"] == pytest.approx(150 / 1000 / 2)
    assert gaps["largest"] == [{"us": 150.0, "after": "d", "before": "e"}, {"us": 3.0, "after": "b", "before": "d"}]
