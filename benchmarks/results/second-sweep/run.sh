#!/usr/bin/env bash
# The second fine-tuning sweep: from the root of a clone at the commit that sweeps.jsonl records, on the data in data/
# (committed, sha256 in data-fingerprints.json), WORKERS runs at a time (default 2), one thread each. Finished runs are
# skipped and killed ones resume from their snapshots, so running it again continues the sweep; the order of the parts
# and the number of workers do not change any run. sweeps.jsonl records every invocation as it was made (the parts
# were also started one by one, side by side with one worker each).
# The checkpoint each seed's variants fine-tune from is committed in checkpoints/ (weights in
# checkpoint-fingerprints.json): on another machine the remaining runs start from the same weights.
set -uo pipefail
cd "$(dirname "$0")/../../.."
LOG=benchmarks/results/second-sweep
sweep() {
    python benchmarks/finetune.py run --log-dir "$LOG" --data-dir "$LOG/data" --workers "${WORKERS:-2}" \
        --threads-per-run 1 "$@" \
        || echo "some runs failed: the list is above; running this script again retries them"
}
# Walker2d-v5: where the paper's loop collapses, and what causes it (IQL, IQL-EDIS's settings, 5 seeds)
sweep --configs configs/cpu/walker2d-medium-replay.yaml --seeds 0 1 2 3 4 --variants iql iql_edis \
    iql_edis_unguided iql_edis_simulator_labels iql_edis_simulator_labels_unguided iql_edis_offline_rows \
    -- --wandb_mode disabled
# Hopper-v5: Cal-QL and Cal-QL-EDIS, one Cal-QL checkpoint per seed made with Cal-QL-EDIS's settings (3 seeds).
# A Cal-QL run takes about 3 hours on one core: a snapshot every 2,000 steps (about 7 minutes) instead of 10,000 keeps
# what a kill loses small (snapshots change nothing in a run: a tiny calql.py run logs the same metrics.jsonl with
# --snapshot_every 0 and 40).
sweep --configs configs/cpu/hopper-medium-replay.yaml --seeds 0 1 2 --variants calql calql_edis \
    calql_edis_unguided -- --wandb_mode disabled --snapshot_every 2000
# Hopper-v5: guided against unguided (s, a) with the simulator's labels, beside IQL (5 seeds)
sweep --configs configs/cpu/hopper-medium-replay.yaml --seeds 0 1 2 3 4 --variants iql \
    iql_edis_simulator_labels iql_edis_simulator_labels_unguided -- --wandb_mode disabled
python benchmarks/finetune.py report --log-dir "$LOG"
