"""The tests whose amqp run is not a pass/fail of the driver, by test function name.

AMQP_EXEMPTIONS: a behaviour RabbitMQ 3.10 quorum queues, or the amqp design built on them
(docs/rabbitmq.md), cannot give; the amqp run is skipped with the reason. A reason says what
the broker or the design lacks, never "fails for now" (or, "not applicable:", why the test
checks something the amqp connection does not have, such as another driver's raw storage).
Most are features the driver refuses at push with a DriverError naming them (groups, limits,
max_length), so a test that merely uses one to set up its case
is exempt with that reason too.

AMQP_DEFECTS: a behaviour the driver should give and does not yet; the amqp run is a strict
xfail (what goes wrong, in the reason), so the run fails once it is fixed and the entry must
go. AMQP_INTERMITTENT: the same for a defect seen in some runs only (a non-strict xfail).
Each one is also written to helper A's requests (/work/notes/requests-B.md).

Keys are test function names (parameters left off), or `<file name>::<function name>` where
a name alone would be ambiguous. Applied in tests/conftest.py (pytest_collection_modifyitems)
to the items whose `backend` or `server_backend` parameter is amqp, and to no other.
"""

from __future__ import annotations

PRIORITY = (
    "priority: quorum queues have no message priorities (x-max-priority is a classic-queue "
    "feature); jobs leave in arrival order whatever their priority"
)
AT_FRONT = (
    "at_front: a quorum queue only appends; a job cannot be put ahead of those already "
    "waiting (a refund goes to the back too)"
)
REPLACE = (
    "replace/coalesce: a published message cannot be changed or taken out of the middle of "
    "its queue, so a waiting job's payload cannot be swapped in its place (the push is kept)"
)
REDELIVERY_ORDER = (
    "exact FIFO after a redelivery: a job whose lease ran out, or a prefetched one given back, "
    "is published again at the back of its queue; returning the delivery itself would keep "
    "its place but the broker would count a delivery (x-delivery-count), which is a try"
)
GROUPS = (
    "groups: one job per group at a time needs each group's line held aside in turn order; "
    "a quorum queue only hands out its head (group refused at push)"
)
LIMITS = (
    "rate and concurrency limits: a held-back job must wait aside in its key's order without "
    "blocking the rest; a quorum queue only hands out its head (limits refused at push)"
)
MAX_LENGTH = (
    "bounded queues: the bound counts delayed and retrying jobs, which wait in the shared delay "
    "ladder and cannot be counted per queue, and drop_oldest must take a message out of the "
    "middle of a queue (max_length refused at push)"
)
BROWSE = (
    "browse: a queue cannot be read without taking its messages, and delayed jobs wait in the "
    "shared delay ladder"
)
FROZEN_HOLDER = (
    "a frozen worker (SIGSTOP) keeps its delivery: its lease runs out only in its own process, "
    "and the broker gives the job to another worker only once the holder's connection closes "
    "(missed AMQP heartbeats: about a minute by default), so no second worker takes the job "
    "over within the test's wait. A thawed holder's save_payload is refused all the same (its "
    "lease ran out: tests/amqp/test_amqp_payloads.py)"
)
DELAYED_COUNT = (
    "per-queue delayed count: delayed jobs wait in the shared delay ladder, which the broker "
    "cannot count per queue (stats.delayed is 0)"
)
CLEAR_DELAYED = (
    "clear purges the queue's own work queue at once; its delayed jobs wait in the shared delay "
    "ladder, which cannot be purged per queue (they are dropped when they come due), so clear "
    "cannot count them"
)
RESERVED_COUNT = (
    "per-queue reserved count: AMQP tells a queue's ready messages only; the deliveries other "
    "processes' consumers hold unacknowledged are counted by no broker call of the driver "
    "(stats.reserved counts this process's own)"
)
DEATH_REDELIVERY = (
    "a dead worker's deliveries all come back the moment its connection closes, the job it "
    "was running included (ahead of its prefetched ones), not each when its lease would lapse"
)
PRUNE = (
    "prune: records are markers in the store that expire at their keep time by themselves "
    "(as Redis keys do) and are not indexed by when they ended, so prune deletes none"
)
CANCEL_COUNT = (
    "a cancelled waiting job's message stays in its quorum queue until it is delivered (and "
    "dropped then): a queue cannot remove one message from its middle, and pending is the "
    "queue's message count"
)


def _each(reason: str, *names: str) -> dict[str, str]:
    return dict.fromkeys(names, reason)


_TABLES: list[dict[str, str]] = [
    _each(
        PRIORITY,
        "test_rule_a_delayed_retry_keeps_its_priority_when_due",
        "test_rule_a_due_prioritized_job_passes_lower_ready_jobs",
        "test_rule_a_job_whose_lease_expired_goes_to_the_head_of_its_level",
        "test_rule_a_refunded_job_goes_to_the_head_of_its_level",
        "test_rule_a_retried_job_goes_behind_the_ready_jobs_of_its_level",
        "test_rule_delayed_prioritized_jobs_are_ordered_when_due",
        "test_rule_extreme_priorities_order_exactly",
        "test_rule_fifo_among_equal_priorities",
        "test_rule_stats_count_prioritized_jobs_and_status_shows_priority",
    ),
    _each(
        AT_FRONT,
        "test_at_front_jobs_go_first_the_latest_first",
        "test_a_delayed_at_front_job_goes_first_once_due",
        "test_refunded_release_goes_first_without_spending_a_try",
        "test_rule_at_front_then_priority_then_ready_order",
    ),
    _each(
        REPLACE,
        "test_a_batch_of_ids_is_decided_as_one_push_after_the_other",
        "test_an_expired_holder_met_in_a_batch_is_ended_and_the_job_stored_in_its_turn",
        "test_counting_coalesced_counts_every_replace",
        "test_counting_a_replace_while_the_holder_runs_is_a_new_successor_not_coalesced",
        "test_a_replace_push_shows_the_new_payload",
        "test_replace_swaps_a_waiting_jobs_payload_in_its_place",
        "test_replace_keeps_the_tries_of_a_retrying_job",
        "test_replace_keeps_a_scheduled_jobs_due_time",
        "test_a_waiting_holder_rejects_keeps_or_takes_the_new_payload",
        "test_replace_by_key_keeps_the_holders_place_and_tries",
        "test_a_running_holder_lets_one_successor_in",
        "test_unique_for_with_a_waiting_holder_allows_replace",
        "test_one_push_with_a_key_twice_stores_one_job",
        "test_history_counts_coalesced_dropped_and_rejected_pushes",
        "test_a_once_key_push_that_replaces_takes_the_key",
        "test_a_once_key_push_in_one_call_with_its_repeat_stores_one_value",
        "test_rule_replace_keeps_the_holders_place_and_priority",
        "test_rule_replace_by_unique_key_keeps_the_holders_priority",
    ),
    _each(
        REDELIVERY_ORDER,
        "test_expired_lease_returns_the_job_to_the_front",
        "test_prefetched_jobs_go_back_unspent_and_in_order_on_stop",
    ),
    _each(
        GROUPS,
        "test_bounded_drop_oldest_of_a_group_holder_passes_the_turn",
        "test_bounded_drop_oldest_of_a_grouped_push_drops_its_own_lines_head",
        "test_bounded_drop_oldest_of_a_grouped_push_with_an_empty_line_drops_the_oldest_ready",
        "test_bounded_drop_oldest_of_its_own_groups_holder_lets_the_new_job_run",
        "test_browse_pending_records_are_the_jobs_status_records",
        "test_group_a_delayed_line_job_already_due_is_ready_when_it_takes_the_turn",
        "test_group_a_delayed_line_job_is_scheduled_until_its_own_due_time",
        "test_group_a_holder_held_by_a_limit_keeps_the_turn",
        "test_group_a_job_with_dependencies_joins_the_line_when_released",
        "test_group_a_line_job_past_its_ttl_expires_when_it_takes_the_turn",
        "test_group_a_line_job_past_its_ttl_reads_expired_and_never_runs",
        "test_group_a_line_jobs_priority_places_it_when_it_takes_the_turn",
        "test_group_a_lost_lease_keeps_the_turn_and_the_next_never_overtakes",
        "test_group_a_refund_keeps_the_turn",
        "test_group_a_released_dependent_takes_a_free_turn_at_once",
        "test_group_a_retry_keeps_the_turn_and_runs_again_before_the_rest",
        "test_group_a_workflow_cancelling_its_grouped_members_passes_the_turn",
        "test_group_an_ack_in_the_reserve_round_trip_hands_out_the_successor",
        "test_group_cancel_and_status_find_a_line_job_without_its_queue",
        "test_group_cancel_of_a_line_job_removes_it_from_the_line",
        "test_group_cancel_of_a_running_holder_keeps_the_turn_until_its_ack",
        "test_group_cancel_of_a_scheduled_holder_passes_the_turn",
        "test_group_cancel_of_a_waiting_holder_passes_the_turn",
        "test_group_clear_removes_the_line_and_resets_the_group",
        "test_group_clear_with_a_running_holder_then_its_ack_frees_the_group",
        "test_group_concurrent_acks_of_two_groups_each_pass_their_own_turn",
        "test_group_fairness_a_single_job_is_not_stuck_behind_a_long_line",
        "test_group_jobs_run_in_push_order_across_many_jobs",
        "test_group_line_job_status_is_queued_with_its_group_and_due_time",
        "test_group_next_becomes_ready_only_after_the_holders_ack",
        "test_group_priority_and_at_front_do_not_reorder_a_line",
        "test_group_replace_of_a_line_job_keeps_its_place",
        "test_group_replace_of_a_ready_holder_keeps_the_turn",
        "test_group_reserve_with_a_big_limit_hands_out_one_job_per_group",
        "test_group_stats_count_line_jobs_as_pending",
        "test_group_ttl_expiry_of_the_holder_is_handed_back_and_passes_the_turn",
        "test_group_two_dispatchers_pushing_into_an_empty_group_make_one_holder",
        "test_group_two_workers_reserving_at_once_get_one_job_per_group",
        "test_groups_on_different_queues_are_independent",
        "test_groups_page_with_offset_and_limit",
        "test_groups_show_holder_and_waiting_count_ordered_by_name",
        "test_jobs_in_a_groups_line_have_their_payloads",
        "test_two_groups_interleave_one_job_each_in_turn",
        "test_bounded_count_includes_delayed_and_line_jobs_not_running_or_deferred",
        # Pauses and counts pass apart from the grouped jobs and the browse it also checks.
        "test_long_queue_names_are_paused_browsed_and_counted_apart",
    ),
    _each(
        LIMITS,
        "test_bounded_jobs_held_by_a_limit_count_as_waiting",
        "test_browse_lists_each_waiting_job_in_exactly_one_state_as_stats_counts_them",
        "test_rule_a_held_job_can_be_cancelled",
        "test_rule_a_held_job_expires_by_its_ttl",
        "test_rule_a_lost_lease_frees_the_slot_and_a_late_ack_does_not_free_it_twice",
        "test_rule_a_refund_frees_the_slot_and_keeps_the_head",
        "test_rule_a_retry_frees_the_slot_and_goes_behind_the_held_job",
        "test_rule_an_idle_wait_returns_when_a_rate_held_job_becomes_allowed",
        "test_rule_an_idle_wait_wakes_when_a_job_of_the_key_stops",
        "test_rule_clear_removes_held_jobs",
        "test_rule_concurrency_1_holds_the_second_job_until_the_first_is_acked",
        "test_rule_concurrency_n_runs_n_at_once",
        "test_rule_held_jobs_of_a_key_go_out_by_priority_then_fifo",
        "test_rule_limit_state_is_per_queue",
        "test_rule_no_head_of_line_blocking",
        "test_rule_rate_and_concurrency_together",
        "test_rule_rate_burst_1_refuses_a_second_start_within_the_interval_without_a_try",
        "test_rule_rate_burst_n_admits_n_starts_at_once_then_the_rate",
        "test_rule_rate_fifo_among_the_held_back_jobs_of_a_key",
    ),
    _each(
        MAX_LENGTH,
        "test_a_push_refused_for_a_full_queue_takes_no_key",
        "test_bounded_a_dropped_job_record_is_kept_for_its_failure_ttl",
        "test_bounded_a_released_dependent_is_never_refused",
        "test_bounded_drop_oldest_drops_the_oldest_ready_job_and_stores_the_new_one",
        "test_bounded_drop_oldest_spares_prioritized_and_scheduled_jobs",
        "test_bounded_drop_oldest_without_a_plain_ready_job_rejects",
        "test_bounded_one_push_call_fills_the_queue_then_refuses_the_rest",
        "test_bounded_pushes_that_add_nothing_are_never_refused_and_never_drop",
        "test_bounded_reject_at_max_length_stores_nothing_and_counts_rejected",
        "test_bounded_retries_and_refunds_are_never_refused",
        "test_bounded_retrying_jobs_count_as_waiting",
        "test_bounded_the_bound_is_per_queue",
        "test_bounded_the_count_is_exact_under_concurrent_pushes",
    ),
    # depends_on and workflow records work (amqp_deps.py); these tests of them also check
    # another behaviour that differs.
    _each(MAX_LENGTH, "test_bounded_dependents_of_a_dropped_job_are_cancelled"),
    _each(BROWSE, "test_browse_deferred_lists_waiting_jobs_in_push_order_without_workflow_records"),
    _each(PRUNE, "test_prune_records_ended_before_deletes_only_records_that_ended_earlier"),
    _each(
        DELAYED_COUNT,
        "test_rule_a_job_with_live_dependencies_is_deferred",
        "test_rule_a_released_job_with_a_pending_delay_is_scheduled_from_its_push",
    ),
    _each(PRIORITY, "test_rule_released_once_every_dependency_succeeded"),
    _each(
        CANCEL_COUNT,
        "test_rule_cancel_of_a_record_finds_it_without_its_queue",
        "test_rule_records_are_not_counted_in_recent",
    ),
    # Its first driver closes holding a job it reserved: the broker hands it to the next.
    _each(DEATH_REDELIVERY, "test_rule_a_succeeded_record_is_kept_for_the_connections_result_ttl"),
    _each(
        BROWSE,
        "test_browse_pending_lists_jobs_in_the_order_reserve_hands_them_out",
        "test_browse_pending_matches_reserve_over_random_mixes_page_by_page",
        "test_browse_pages_with_offset_and_limit",
        "test_browse_delayed_lists_jobs_by_due_time_retries_included",
        "test_browse_reserved_lists_running_jobs_by_lease_expiry",
        "test_browse_a_queue_of_ten_thousand_jobs_in_pages",
        # Pausing passes; the test ends by listing the pending job.
        "test_pause_is_seen_by_a_second_driver_and_resume_undoes_it",
    ),
    _each(DELAYED_COUNT, "test_bulk_keeps_order_and_size_counts_every_job"),
    _each(CLEAR_DELAYED, "test_clear_removes_waiting_jobs"),
    _each(CANCEL_COUNT, "test_cancel_removes_a_waiting_job"),
    # -- the worker-process tests (server_backend) --
    _each(
        GROUPS,
        "test_a_worker_killed_mid_job_frees_its_group_in_order_and_never_two_at_once",
        "test_retries_with_delays_keep_each_groups_order_under_two_worker_processes",
        # The app's device routes dispatch with a group per device (app/routes.py).
        "test_each_device_s_readings_run_one_at_a_time_in_order_under_4_workers",
        "test_a_device_with_10000_waiting_jobs_does_not_hold_up_another_s_one_job",
        "test_1000_readings_arriving_while_the_device_s_job_runs_end_in_one_more_run",
    ),
    _each(MAX_LENGTH, "test_the_bound_is_exact_under_pushes_from_four_processes"),
    # Its third round pushes a unique key with on_duplicate="replace".
    _each(REPLACE, "test_one_job_per_id_and_per_key_under_four_dispatchers"),
    _each(DEATH_REDELIVERY, "test_a_prefetched_job_of_a_dead_worker_comes_back_quickly"),
    _each(
        LIMITS,
        "test_rate_limit_5_per_second_holds_across_3_workers",
        "test_concurrency_limit_2_holds_across_3_workers",
    ),
    _each(
        BROWSE,
        # RQ's Queue.job_ids lists the waiting jobs through browse.
        "test_two_senders_enqueueing_the_same_job_id_at_once_store_it_once",
        "test_job_ids_of_ten_thousand_jobs_is_paged_not_one_trip_per_job",
    ),
    _each(FROZEN_HOLDER, "test_a_frozen_worker_whose_lease_lapsed_cannot_write_over_the_new_owner"),
    _each(DELAYED_COUNT, "test_dispatch_from_a_plain_script"),
    _each(
        RESERVED_COUNT,
        "test_a_pause_reaches_a_busy_worker_within_about_a_second",
        "test_sigkill_of_a_worker_while_its_queue_is_paused_loses_nothing",
        "test_pause_two_prefetching_workers_kill_one_resume_nothing_lost",
    ),
    _each(
        PRUNE,
        "test_prune_deletes_records_past_their_keep_time",
        "test_prune_older_than_on_a_server_backend",
    ),
    _each(
        "not applicable: the test counts the SQL statements of the database driver's engine "
        "(it skips Redis the same way); the amqp connection has none",
        "test_enqueue_many_with_job_ids_on_sql_is_not_a_statement_per_job",
    ),
    _each(
        "not applicable: the releases before #12-#14 have no amqp connection (their "
        "QUEUE_CONNECTION refuses it), so nothing of theirs can be read or run on one",
        "test_new_release_reads_the_old_releases_waiting_jobs",
        "test_new_worker_runs_what_the_old_release_left",
        "test_old_and_new_side_by_side_on_one_queue",
    ),
    # Also the cross-process reserved count (RESERVED_COUNT).
    _each(DELAYED_COUNT, "test_stats_match_what_was_put_in"),
    _each(RESERVED_COUNT, "test_clear_needs_force_and_leaves_running_jobs"),
    _each(
        "not applicable: the test reads the worker registry's raw storage for the redis and "
        "database connections only; the amqp connection's registry is its store's",
        "test_a_killed_worker_leaves_the_registry_when_its_heartbeat_expires",
    ),
]


def _merged(tables: list[dict[str, str]]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for table in tables:
        for name, reason in table.items():
            if name in merged:
                raise ValueError(f"tests/amqp_exemptions.py names {name} twice")
            merged[name] = reason
    return merged


AMQP_EXEMPTIONS: dict[str, str] = _merged(_TABLES)

AMQP_DEFECTS: dict[str, str] = {}

#: Defects seen in some runs and not others: a non-strict xfail (a pass is no news), with
#: how often it failed in the reason. Moved to AMQP_DEFECTS or removed once understood.
AMQP_INTERMITTENT: dict[str, str] = {}
