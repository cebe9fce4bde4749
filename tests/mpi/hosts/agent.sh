#!/usr/bin/env bash
# Open MPI's launch agent for the simulated hosts of hosts.sh (beside this file), in place of ssh:
#
#   mpirun --mca plm_rsh_agent tests/mpi/hosts/agent.sh ...
#
# Open MPI's rsh launcher calls it as it calls ssh, `agent.sh HOST WORD...`, to start its daemon
# (orted) on HOST. Like ssh, it joins the WORDs with spaces and runs them through a shell (they are
# shell code: "PATH=...; export PATH; ... orted -mca ..."), with a login's environment rather than
# the caller's, on the host: inside HOST's network and UTS namespaces. Its status is the command's,
# or 255 when HOST is not one of the simulated hosts (ssh's status when it cannot connect).
# Needs root (nsenter). `bash hosts.sh exec HOST CMD...` is this, for people.
set -euo pipefail

# Where hosts.sh keeps the hosts' UTS namespaces (bind mounts), and the name prefix of their
# network namespaces (/run/netns/mproc-h1...). Both must match hosts.sh.
state=/run/mproc-hosts

if (($# < 2)); then
    echo "agent.sh: usage: agent.sh HOST COMMAND... (as ssh is called)" >&2
    exit 255
fi
host=$1
shift
if [[ ! $host =~ ^mproc-h[0-9]+$ || ! -e /run/netns/$host || ! -e $state/uts/$host ]]; then
    echo "agent.sh: $host is not a simulated host (bash tests/mpi/hosts/hosts.sh up makes mproc-h1..mproc-h3)" >&2
    exit 255
fi

# A login's environment, as sshd gives one: not the caller's variables (Open MPI must pass what its
# daemons need on their command line, as it must across real hosts).
exec env -i HOME="${HOME:-/root}" USER="$(id -un)" LOGNAME="$(id -un)" SHELL=/bin/sh \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG="${LANG:-C.UTF-8}" \
    nsenter --net="/run/netns/$host" --uts="$state/uts/$host" -- /bin/sh -c "$*"
