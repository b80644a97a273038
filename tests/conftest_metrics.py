"""Shared by test_workflows and test_faults: a stage's metrics with what measures the run (wall
time, speed, memory) left out, so two runs that computed the same result compare equal."""

# Keys (at any depth of a metrics file) that measure the run rather than its result: wall time,
# speed and memory. Everything else, the provenance block included, must repeat exactly.
RUN_MEASURES = {
    "seconds", "examples_per_s", "rows_per_s", "peak_memory_gib",       # prepare, train, evaluate
    "trial_seconds_mean", "rss_mib_first_trial", "rss_mib_last_trial", "rss_mib_max",  # tune
    "encode_wait_s", "encode_thread_s", "transfer_s", "generate_s", "decode_s", "total_s",  # eval timing
    "gguf_agreement_seconds",                                            # export
}


def without_run_measures(tree):
    if isinstance(tree, dict):
        return {k: without_run_measures(v) for k, v in tree.items() if k not in RUN_MEASURES}
    return tree
