# Sourced by run_gpu.sh and run_gpu_train.sh: run one benchmark command with its output teed to a log, within
#   RUN_TIMEOUT  seconds per run (optional), and
#   DEADLINE     a `date +%s` time by which every run must have ended (optional; benchmarks/device_run.sh sets
#                it so that one call on a lent GPU machine ends inside the call's limit with its results).
# A failed or stopped run is reported and the caller goes on to the next: a run that ran out of time still
# leaves what it wrote (metrics.jsonl of a training run; nothing for a `davit bench` that did not finish).
#
#   run_limited NAME LOGFILE COMMAND...
run_limited() {
    local name=$1 log=$2; shift 2
    local t=${RUN_TIMEOUT:-} limit=()
    if [[ -n "${DEADLINE:-}" ]]; then
        local left=$((DEADLINE - $(date +%s)))
        if ((left < 30)); then
            echo "== $name: skipped, ${left} s left before the deadline" >&2
            return 0
        fi
        if [[ -z $t ]] || ((left < t)); then t=$left; fi
    fi
    if [[ -n $t ]]; then limit=(timeout -k 10 "$t"); fi
    echo "== $name: $*${t:+ (at most $t s)}" >&2
    "${limit[@]}" "$@" 2>&1 | tee "$log" || echo "== $name: exit status ${PIPESTATUS[0]} (124: stopped after $t s)" >&2
}
