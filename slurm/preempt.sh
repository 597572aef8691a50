# Sourced by the batch scripts: run the training step so that a time-limit warning or a
# preemption ends in a checkpoint and a requeue, not in lost work.
#
#   run_step srun ... python launch/train.py ...   # runs the step in the background, waits
#
# - SIGUSR1 (`#SBATCH --signal=B:USR1@<s>`: <s> seconds before the time limit) and SIGTERM
#   reach this batch shell; they are forwarded to the srun step, whose ranks then stop at
#   the next step boundary with a checkpoint and exit 75 (sapt-train's EXIT_PREEMPTED).
# - After a clean stop on our own warning (SIGUSR1), the job requeues itself
#   (`scontrol requeue`): same job id, same command, and the run resumes from
#   <output_dir>/state. On SIGTERM SLURM is already ending the job: a preemption or
#   `scontrol requeue` requeues it (with --requeue), a `scancel` does not.
# - `wait` returns early whenever a trapped signal arrives: loop until srun has exited.

SAPT_EXIT_PREEMPTED=75
_SAPT_SIGNAL=""
_SAPT_STEP_PID=""

_sapt_forward() {
    _SAPT_SIGNAL=$1
    echo "[sapt $(date +%T)] batch script got SIG$1: asking the training step to checkpoint and stop" >&2
    if [ -n "$_SAPT_STEP_PID" ]; then kill -s "$1" "$_SAPT_STEP_PID" 2>/dev/null || true; fi
}
trap '_sapt_forward USR1' USR1
trap '_sapt_forward TERM' TERM

# rank 0 writes this file after a clean stop (on the submit dir: every node sees it)
export SAPT_PREEMPT_MARKER="${SLURM_SUBMIT_DIR:-.}/.sapt-slurm/preempted-${SLURM_JOB_ID:-$$}"

run_step() {
    rm -f "$SAPT_PREEMPT_MARKER"
    "$@" &
    _SAPT_STEP_PID=$!
    local rc
    while :; do
        wait "$_SAPT_STEP_PID"
        rc=$?
        kill -0 "$_SAPT_STEP_PID" 2>/dev/null || break
    done
    # a signal may have interrupted the last wait after the step ended: ask once more
    wait "$_SAPT_STEP_PID" 2>/dev/null
    local again=$?
    [ "$again" != 127 ] && rc=$again
    echo "[sapt $(date +%T)] training step exited with $rc" >&2
    # the marker, not only the code: srun --kill-on-bad-exit may report a kill (143) when
    # the ranks leave a moment apart after the same clean stop
    if [ "$rc" = "$SAPT_EXIT_PREEMPTED" ] || [ -f "$SAPT_PREEMPT_MARKER" ]; then
        echo "[sapt] clean stop: $(cat "$SAPT_PREEMPT_MARKER" 2>/dev/null)" >&2
        rm -f "$SAPT_PREEMPT_MARKER"
        if [ "$_SAPT_SIGNAL" = TERM ]; then
            echo "[sapt] stopped on SIGTERM: SLURM decides (requeued if preempted or scontrol requeue)" >&2
        else
            echo "[sapt] stopped cleanly before the time limit: requeueing job ${SLURM_JOB_ID}" >&2
            scontrol requeue "$SLURM_JOB_ID"
        fi
        exit 0
    fi
    exit "$rc"
}
