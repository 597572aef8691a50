#!/usr/bin/env bash
# The test suite (the README's test command ends here): pytest, plus what the SLURM tests
# need. Those run the project's sbatch scripts on real SLURM clusters that the tests start
# with slurm/local_cluster.sh when SLURM is installed and this runs as root: one node
# (tests/test_slurm.py) and two nodes in network namespaces (tests/test_slurm_multinode.py,
# which also needs `ip`); elsewhere they skip and say why.
#
#   SAPT_INSTALL_SLURM=1   install Debian's SLURM packages first (root, apt; CI sets it)
#   SAPT_REQUIRE_SLURM=1   a SLURM test that cannot run fails instead of skipping (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SAPT_INSTALL_SLURM:-0}" = 1 ] && ! command -v slurmctld >/dev/null; then
    echo "scripts/test.sh: installing SLURM for the SLURM tests"
    bash slurm/local_cluster.sh install
fi
# the slowest tests are listed at the end (CI prints them too)
exec pytest --durations=15 "$@"
