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
# - A lost node: the ranks left end within `distributed.timeout_s` (exit 69) and write
#   $SAPT_LOST_MARKER. srun may then wait on for the lost node's tasks, which it cannot
#   reach (a cut link, a node off) until slurmctld declares the node down (SlurmdTimeout,
#   often 300 s): SAPT_LOST_GRACE seconds (default 30) after the marker appears, srun is
#   killed and the job ends with 69, the reason in its log.
# - The step is polled once a second: a trapped signal is forwarded within that second.

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
# a rank that ends because a peer is gone writes its message here (sapt_dist/distributed/watchdog.py)
export SAPT_LOST_MARKER="${SLURM_SUBMIT_DIR:-.}/.sapt-slurm/lost-${SLURM_JOB_ID:-$$}"
SAPT_EXIT_PEER_LOST=69

run_step() {
    if [ "${SAPT_DRY_RUN:-0}" = 1 ]; then  # --dry-run: the launch line, nothing started
        printf '[sapt] dry run: would run:'
        printf ' %q' "$@"
        printf '\n'
        return 0
    fi
    rm -f "$SAPT_PREEMPT_MARKER" "$SAPT_LOST_MARKER"
    "$@" &
    _SAPT_STEP_PID=$!
    local rc lost_at=""
    while kill -0 "$_SAPT_STEP_PID" 2>/dev/null; do
        if [ -f "$SAPT_LOST_MARKER" ]; then
            [ -n "$lost_at" ] || lost_at=$SECONDS
            if [ $((SECONDS - lost_at)) -ge "${SAPT_LOST_GRACE:-30}" ]; then
                echo "[sapt $(date +%T)] the step still waits for a lost node's tasks ${SAPT_LOST_GRACE:-30} s after a rank reported the loss: killing srun" >&2
                kill -9 "$_SAPT_STEP_PID" 2>/dev/null || true
            fi
        fi
        # `wait` on the sleep returns at once when a trapped signal arrives
        sleep 1 &
        wait $! 2>/dev/null
    done
    wait "$_SAPT_STEP_PID" 2>/dev/null
    rc=$?
    echo "[sapt $(date +%T)] training step exited with $rc" >&2
    if [ -f "$SAPT_LOST_MARKER" ]; then
        echo "[sapt] a node was lost: $(cat "$SAPT_LOST_MARKER")" >&2
        echo "[sapt] the run folder keeps its last checkpoint: submit the same command again to resume (on any node count)" >&2
        rm -f "$SAPT_LOST_MARKER"
        exit "$SAPT_EXIT_PEER_LOST"
    fi
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

# --help / --dry-run of the batch scripts (bash slurm/<script>.sbatch --help), no job needed
sapt_usage() {  # the script's header comment: its documentation
    sed -n '2,/^#SBATCH/{/^#SBATCH/d;s/^# \{0,1\}//;p}' "$1"
}

sapt_first_node() {  # the job's first node (the rendezvous); this host outside a job
    if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null; then
        scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1
    else
        hostname
    fi
}

sapt_check_config() {  # the config and overrides load as sapt-train would load them
    "${SAPT_PYTHON:-python}" -c '
import sys
from sapt_dist.config import ConfigError, load_config
try:
    load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    print(f"[sapt] dry run: {e}", file=sys.stderr)
    sys.exit(2)
print(f"[sapt] dry run: the config loads ({sys.argv[1]})", file=sys.stderr)
' "$@"
}
