"""jobs/bench/serve/targets.py checks the targets of the phases that ran, and only those."""

from __future__ import annotations

from jobs.bench.serve.phases.chat import chat_summary
from jobs.bench.serve.phases.kills import kill_split
from jobs.bench.serve.targets import check_targets


def _result(**phases) -> dict:
    return {"config": {"overload_fast_503_ms": 1000.0, "chat_max_latency_ratio": 1.10}, **phases}


GOOD = {
    "chat": {"chat_template": False, "select": {"requests": 12, "ok": 12}, "chat": {"requests": 12, "ok": 12},
             "p50_ratio_chat_vs_select": 1.04, "twins_answered": 12, "twins_same_pick": 12},
    "fault": {"replicas_before": 2, "in_flight_at_kill": 16, "lost_in_flight": 7, "lost_before_kill": 0,
              "sent_after_kill": 140, "ok_sent_after_kill": 139, "success_fraction_sent_after_kill": 0.9929},
    "poison": {"hostile": {"beam999": {"status": 422}, "greedy_newline": {"status": 422}},
               "mixed_batch_statuses": [200, 422, 200, 422, 200, 422, 200],
               "after_success_fraction": 1.0, "after_p50_vs_baseline": 1.06},
    "overload": {"statuses": {"200": 91, "503": 242}, "503_without_retry_after": 0, "503_p50_ms": 400.0},
    "generator_kill": {"success_fraction": 0.963, "lost_in_flight": 1, "lost_before_kill": 0,
                       "success_fraction_sent_after_kill": 1.0, "recovery_s": 51.0},
}


def test_phases_that_ran_are_checked_and_met():
    targets = check_targets(_result(**GOOD))
    assert all(targets.values()) and len(targets) == 18, targets
    assert check_targets(_result(overload=GOOD["overload"])).keys() == {
        "overload_only_200_and_503", "overload_some_503", "overload_503_all_retry_after",
        "overload_503_p50_fast", "overload_some_200"}
    # a generator with a chat template sees other prompts on the two routes: picks are not compared
    templated = {**GOOD["chat"], "chat_template": True, "twins_same_pick": 3}
    assert check_targets(_result(chat=templated)).keys() == {"chat_all_200", "chat_p50_vs_select_le_max_ratio"}


def test_each_miss_is_named():
    bad = {
        "chat": {**GOOD["chat"], "chat": {"requests": 12, "ok": 11}, "p50_ratio_chat_vs_select": 1.12,
                 "twins_same_pick": 11},
        "fault": {**GOOD["fault"], "replicas_before": 1, "lost_before_kill": 1,
                  "success_fraction_sent_after_kill": 0.98},
        "poison": {**GOOD["poison"], "hostile": {"beam999": {"status": 503}}, "after_p50_vs_baseline": 1.6,
                   "mixed_batch_statuses": [200, 422, 503, 422, 200, 422, 200]},
        "overload": {"statuses": {"200": 5, "500": 1}, "503_without_retry_after": 0, "503_p50_ms": None},
        "generator_kill": {"success_fraction": 0.98, "lost_before_kill": 2,
                           "success_fraction_sent_after_kill": 0.95, "recovery_s": None},
    }
    failed = {k for k, ok in check_targets(_result(**bad)).items() if not ok}
    assert failed == {"chat_all_200", "chat_p50_vs_select_le_max_ratio", "chat_same_pick_as_select",
                      "fault_two_replicas_before_kill", "fault_sent_after_kill_success_ge_0.99",
                      "fault_no_loss_before_kill",
                      "poison_hostile_all_4xx", "poison_mixed_batch_good_200_bad_4xx",
                      "poison_after_p50_le_1.5x_select", "overload_only_200_and_503", "overload_some_503",
                      "generator_kill_sent_after_kill_success_ge_0.99", "generator_kill_no_loss_before_kill",
                      "generator_kill_recovered"}
    slow = {**GOOD["overload"], "503_p50_ms": 4400.0, "503_without_retry_after": 3}
    failed = {k for k, ok in check_targets(_result(overload=slow)).items() if not ok}
    assert failed == {"overload_503_p50_fast", "overload_503_all_retry_after"}
    # no answered twin, or no latency (every request failed): missed, not vacuously met
    none = {**GOOD["chat"], "twins_answered": 0, "twins_same_pick": 0, "p50_ratio_chat_vs_select": None}
    failed = {k for k, ok in check_targets(_result(chat=none)).items() if not ok}
    assert failed == {"chat_p50_vs_select_le_max_ratio", "chat_same_pick_as_select"}


def test_kill_split_counts_requests_by_when_they_were_sent():
    # (start, end, status, body, Retry-After); the kill at t=10
    records = [(1, 2, 200, {}, None), (3, 9, 503, {}, None),     # before the kill: one lost
               (8, 11, 200, {}, None), (9, 12, 503, {}, None),   # in flight at the kill: one lost
               (10, 13, 200, {}, None), (11, 14, 0, "x", None), (12, 15, 200, {}, None)]  # sent after
    assert kill_split(records, 10.0) == {
        "in_flight_at_kill": 2, "lost_in_flight": 1, "lost_before_kill": 1, "sent_after_kill": 3,
        "ok_sent_after_kill": 2, "success_fraction_sent_after_kill": 0.6667}


def test_chat_summary_pairs_twins_and_compares_picks_and_latency():
    def select(text):
        return {"response": text}

    def chat(text):
        return {"choices": [{"message": {"role": "assistant", "content": text}}]}

    records = [("select", (0, 0), 0.0, 1.0, 200, select("a")), ("chat", (0, 0), 1.0, 2.1, 200, chat("a")),
               ("chat", (1, 1), 0.0, 1.2, 200, chat("b")), ("select", (1, 1), 1.2, 2.2, 200, select("c")),
               ("select", (0, 2), 2.0, 3.0, 200, select("d")), ("chat", (0, 2), 3.0, 3.5, 503, "busy")]
    s = chat_summary(records, 2, chat_template=False)
    assert s["select"] == {"requests": 3, "ok": 3, "p50_ms": 1000.0, "p99_ms": 1000.0}
    assert s["chat"]["requests"] == 3 and s["chat"]["ok"] == 2 and s["chat"]["p50_ms"] in (1100.0, 1200.0)
    assert s["p50_ratio_chat_vs_select"] == round(s["chat"]["p50_ms"] / 1000.0, 3)
    assert (s["twins_answered"], s["twins_same_pick"]) == (2, 1)  # (0, 2): the chat twin failed


def test_chat_summary_streams_time_to_first_content_and_compares_text():
    chat = {"choices": [{"message": {"role": "assistant", "content": "a b"}}]}
    records = [("chat", (0, 0), 0.0, 1.0, 200, chat), ("stream", (0, 0), 1.0, 2.2, 200, "a b"),
               ("chat", (0, 1), 2.0, 3.0, 200, chat), ("stream", (0, 1), 3.0, 4.0, 200, "other"),
               ("stream", (0, 2), 4.0, 5.0, 200, None)]  # no [DONE]: not ok
    s = chat_summary(records, 1, chat_template=False, firsts=[0.9, 1.1])
    assert s["stream"]["requests"] == 3 and s["stream"]["ok"] == 2 and s["stream"]["p50_ms"] in (1000.0, 1200.0)
    assert s["stream"]["first_content_p50_ms"] in (900.0, 1100.0)
    assert s["stream"]["first_content_vs_chat_p50"] == round(s["stream"]["first_content_p50_ms"] / 1000.0, 3)
    assert (s["stream_twins"], s["stream_same_text"]) == (2, 1)
    result = {"config": {"chat_max_latency_ratio": 1.1, "chat_stream": True},
              "chat": {**s, "select": {"requests": 1, "ok": 1}, "p50_ratio_chat_vs_select": 1.0,
                       "twins_answered": 1, "twins_same_pick": 1}}
    failed = {k for k, ok in check_targets(result).items() if not ok}
    assert failed == {"chat_stream_all_done", "chat_stream_same_text_as_chat"}
