"""jobs/bench/serve.py checks the targets of the phases that ran, and only those."""

from __future__ import annotations

from jobs.bench.serve import check_targets


def _result(**phases) -> dict:
    return {"config": {"overload_fast_503_ms": 1000.0}, **phases}


GOOD = {
    "poison": {"hostile": {"beam999": {"status": 422}, "greedy_newline": {"status": 422}},
               "mixed_batch_statuses": [200, 422, 200, 422, 200, 422, 200],
               "after_success_fraction": 1.0, "after_p50_vs_baseline": 1.06},
    "overload": {"statuses": {"200": 91, "503": 242}, "503_without_retry_after": 0, "503_p99_ms": 400.0},
    "generator_kill": {"success_fraction": 0.995, "recovery_s": 51.0},
}


def test_phases_that_ran_are_checked_and_met():
    targets = check_targets(_result(**GOOD))
    assert all(targets.values()) and len(targets) == 11, targets
    assert check_targets(_result(overload=GOOD["overload"])).keys() == {
        "overload_only_200_and_503", "overload_some_503", "overload_503_all_retry_after",
        "overload_503_p99_fast", "overload_some_200"}


def test_each_miss_is_named():
    bad = {
        "poison": {**GOOD["poison"], "hostile": {"beam999": {"status": 503}}, "after_p50_vs_baseline": 1.6,
                   "mixed_batch_statuses": [200, 422, 503, 422, 200, 422, 200]},
        "overload": {"statuses": {"200": 5, "500": 1}, "503_without_retry_after": 0, "503_p99_ms": None},
        "generator_kill": {"success_fraction": 0.98, "recovery_s": None},
    }
    failed = {k for k, ok in check_targets(_result(**bad)).items() if not ok}
    assert failed == {"poison_hostile_all_4xx", "poison_mixed_batch_good_200_bad_4xx",
                      "poison_after_p50_le_1.5x_select", "overload_only_200_and_503", "overload_some_503",
                      "generator_kill_success_ge_0.99", "generator_kill_recovered"}
    slow = {**GOOD["overload"], "503_p99_ms": 5192.5, "503_without_retry_after": 3}
    failed = {k for k, ok in check_targets(_result(overload=slow)).items() if not ok}
    assert failed == {"overload_503_p99_fast", "overload_503_all_retry_after"}
