"""The targets of the phases that ran, and only those: what the JSON line's ``targets`` and
``failed_targets`` hold and what makes the exit status 1."""

from __future__ import annotations


def check_targets(result: dict) -> dict[str, bool]:
    """Each target of the phases that ran, name → met."""
    t: dict[str, bool] = {}
    if "ratio_score32_vs_offline" in result:
        t["ratio_score32_vs_offline_ge_0.7"] = result["ratio_score32_vs_offline"] >= 0.7
    if "autoscaling" in result:
        a = result["autoscaling"]
        t["scaled_up"] = a["peak_running"] > a["min_replicas"]
        t["scaled_back_down"] = a["scale_down_after_idle_s"] is not None
    if "fault" in result:  # what it counts: KILL_TARGET_COUNTS
        f = result["fault"]
        t["fault_two_replicas_before_kill"] = f.get("replicas_before", 0) >= 2
        t["fault_sent_after_kill_success_ge_0.99"] = f.get("success_fraction_sent_after_kill", 0) >= 0.99
        t["fault_no_loss_before_kill"] = f.get("lost_before_kill", 1) == 0
    if "chat" in result:
        ch, cfg = result["chat"], result["config"]
        t["chat_all_200"] = all(ch[k]["ok"] == ch[k]["requests"] > 0 for k in ("select", "chat"))
        t["chat_p50_vs_select_le_max_ratio"] = ((ch["p50_ratio_chat_vs_select"] or float("inf"))
                                                <= cfg["chat_max_latency_ratio"])
        if not ch["chat_template"]:  # templated chat prompts differ from the instruction: other candidates
            t["chat_same_pick_as_select"] = ch["twins_answered"] > 0 and ch["twins_same_pick"] == ch["twins_answered"]
        if cfg.get("chat_stream"):
            s = ch["stream"]
            t["chat_stream_all_done"] = s["ok"] == s["requests"] > 0
            t["chat_stream_same_text_as_chat"] = ch["stream_twins"] > 0 and ch["stream_same_text"] == ch["stream_twins"]
    if "poison" in result:
        p = result["poison"]
        t["poison_hostile_all_4xx"] = all(400 <= h["status"] < 500 for h in p["hostile"].values())
        t["poison_mixed_batch_good_200_bad_4xx"] = all(
            (st == 200) if i % 2 == 0 else (400 <= st < 500) for i, st in enumerate(p["mixed_batch_statuses"]))
        t["poison_after_success_ge_0.99"] = p["after_success_fraction"] >= 0.99
        t["poison_after_p50_le_1.5x_select"] = (p["after_p50_vs_baseline"] or float("inf")) <= 1.5
    if "overload" in result:
        o = result["overload"]
        t["overload_only_200_and_503"] = set(o["statuses"]) <= {"200", "503"}
        t["overload_some_503"] = o["statuses"].get("503", 0) > 0
        t["overload_503_all_retry_after"] = o["503_without_retry_after"] == 0
        t["overload_503_p50_fast"] = (o["503_p50_ms"] or 0) <= result["config"]["overload_fast_503_ms"]
        t["overload_some_200"] = o["statuses"].get("200", 0) > 0
    if "generator_kill" in result:  # what it counts: KILL_TARGET_COUNTS, as in fault
        g = result["generator_kill"]
        t["generator_kill_sent_after_kill_success_ge_0.99"] = g.get("success_fraction_sent_after_kill", 0) >= 0.99
        t["generator_kill_no_loss_before_kill"] = g.get("lost_before_kill", 1) == 0
        t["generator_kill_recovered"] = g["recovery_s"] is not None
    return t
