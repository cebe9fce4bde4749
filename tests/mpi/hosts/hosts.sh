#!/usr/bin/env bash
# A cluster of three hosts on one machine, for mproc::mpi across hosts (docs/mpi.md, "Trying a
# cluster on one machine"). Each host is a network namespace and a UTS namespace of its own
# (hostname mproc-hN, address 10.77.0.N/24 on its interface mproc0, N = 1..3), and the hosts are
# joined by a bridge that lives in a namespace of its own: nothing is added to this machine's own
# network. Open MPI reaches the hosts through agent.sh (beside this file) as it would through ssh,
# and its processes talk TCP over mproc0. Files and the process table stay shared, as on a
# cluster with a shared filesystem: a program has the same path on every host. Needs root.
#
#   bash tests/mpi/hosts/hosts.sh up                 make the hosts (removes any left from before)
#   bash tests/mpi/hosts/hosts.sh mpirun ARG...      mpirun on mproc-h1, told to use the three hosts
#   bash tests/mpi/hosts/hosts.sh run CMD...         CMD on mproc-h1, with Open MPI told in its
#                                                    environment (OMPI_MCA_*) to use the three hosts:
#                                                    every mpirun that CMD starts (ctest) uses them
#   bash tests/mpi/hosts/hosts.sh exec HOST CMD...   run CMD on HOST (mproc-h1, mproc-h2, mproc-h3)
#   bash tests/mpi/hosts/hosts.sh down               end what runs on the hosts and remove them
#   bash tests/mpi/hosts/hosts.sh test BUILD         up; the MPI example and tests (ctest -L mpi)
#                                                    of the build folder BUILD across the hosts;
#                                                    down, whatever happened (also on Ctrl-C)
#
# Where this machine cannot make the hosts (not root; namespaces, veth or bridge links refused by
# the kernel or a container), `up` and `test` print a line starting with "SKIPPED:" that says why,
# and exit 77. One cluster at a time: `up` removes the hosts of any earlier run.
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
hosts=(mproc-h1 mproc-h2 mproc-h3) # also the names of their network namespaces (/run/netns/)
bridge_ns=mproc-br                 # the bridge's namespace (the "switch"); it has no address
# The hosts' UTS namespaces, kept by bind mounts in $state/uts/ (as `ip netns` keeps network ones
# in /run/netns/), and the hostfile. agent.sh has the same path.
state=/run/mproc-hosts
iface=mproc0   # each host's interface, the one Open MPI is told to use
subnet=10.77.0 # host N is $subnet.N/24
skip_status=77
# With MPROC_HOSTS_DELAY_MS=N (`up`, `test`), host 1's cable delays every frame N ms each way.
delay_ms=${MPROC_HOSTS_DELAY_MS:-0}
[[ $delay_ms =~ ^[0-9]+$ ]] || { echo "hosts.sh: MPROC_HOSTS_DELAY_MS must be a whole number of milliseconds" >&2; exit 2; }

# Open MPI's settings for the hosts, as (parameter value) pairs: `mpirun` gives them as --mca
# options, `test` as OMPI_MCA_* variables (the tests' own mpirun command lines stay as they are).
mca=(
    plm_rsh_agent "$here/agent.sh"  # reach a host as through ssh: agent.sh HOST COMMAND...
    plm_rsh_no_tree_spawn 1         # mpirun starts every daemon itself; no daemon starts another
    rmaps_base_mapping_policy node  # ranks round-robin over the hosts: rank r on host r mod 3 + 1
    btl "tcp,self"                  # TCP between ranks (shared memory would not cross hosts)
    btl_tcp_if_include "$iface"     # the ranks' traffic on mproc0,
    oob_tcp_if_include "$iface"     # and that of mpirun and its daemons
    # mpirun and its daemons notice a host cut off when TCP gives their connection up: an idle
    # one after this keepalive (2 s + 3 probes 1 s apart; Open MPI's default is 300 s + 9 x 20 s),
    # one with data in flight after net.ipv4.tcp_retries2 retransmissions (set in `up`).
    oob_tcp_keepalive_time 2
    oob_tcp_keepalive_intvl 1
    oob_tcp_keepalive_probes 3
)
# Retransmissions before TCP gives a connection up: about 10 s (the kernel's default, 15, is
# about 15 minutes). A cluster that must end a job soon after losing a host sets this too.
tcp_retries2=4

say() { printf '\n==> %s\n' "$*"; }
die() {
    echo "hosts.sh: $*" >&2
    exit 1
}
usage() {
    sed -n '10,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# skip REASON: the line that says this run was skipped and why, then exit 77.
skip() {
    echo "SKIPPED: the simulated hosts cannot be made on this machine: $*"
    exit "$skip_status"
}

# Skips unless every kind of thing `up` makes can be made: a named network namespace holding a veth
# pair and a bridge, and a persistent UTS namespace with a hostname of its own.
check_can_make_hosts() {
    ((EUID == 0)) || skip "they need root (network namespaces, links, nsenter); run with sudo"
    local tool
    for tool in ip unshare nsenter mount umount; do
        command -v "$tool" >/dev/null 2>&1 || skip "the command '$tool' is missing (Debian: iproute2, util-linux, mount)"
    done
    local probe=mproc-probe err
    ip netns del "$probe" 2>/dev/null || true
    if ! err=$({ ip netns add "$probe" &&
        ip -n "$probe" link add mproc-pa type veth peer name mproc-pb &&
        ip -n "$probe" link add mproc-pbr type bridge; } 2>&1); then
        ip netns del "$probe" 2>/dev/null || true
        skip "making a network namespace with a veth pair and a bridge failed: ${err//$'\n'/ }"
    fi
    ip netns del "$probe"
    mkdir -p "$state/uts"
    touch "$state/uts/$probe"
    if ! err=$(unshare --uts="$state/uts/$probe" hostname "$probe" 2>&1); then
        rm -f "$state/uts/$probe"
        rmdir "$state/uts" "$state" 2>/dev/null || true
        skip "making a UTS namespace (a hostname of its own) failed: ${err//$'\n'/ }"
    fi
    umount "$state/uts/$probe"
    rm -f "$state/uts/$probe"
}

# The pids of every process on the hosts or in the bridge's namespace, but this shell's.
pids_on_hosts() {
    local ns
    for ns in "${hosts[@]}" "$bridge_ns"; do
        if [[ -e /run/netns/$ns ]]; then ip netns pids "$ns" 2>/dev/null || true; fi
    done | grep -vx -e "$$" -e "$BASHPID" || true
}

# Ends what runs on the hosts (mpirun, its daemons and ranks, a ctest of a run cut short), then
# removes the namespaces (their links and the bridge go with them), the bind mounts and the state.
# Quiet when there is nothing; fails, saying what is left, if anything is.
down() {
    local pids sig tries
    for sig in TERM KILL; do
        pids=$(pids_on_hosts)
        [[ -z $pids ]] && break
        echo "hosts.sh: ending $(wc -w <<<"$pids") process(es) on the hosts (SIG$sig)" >&2
        # shellcheck disable=SC2086 # one pid per word
        kill -s "$sig" $pids 2>/dev/null || true
        # TERM first so that mpirun can end its daemons and remove its session folders; what is
        # still there after 5 s is killed.
        for ((tries = 0; tries < 50; tries++)); do
            [[ -z $(pids_on_hosts) ]] && break
            sleep 0.1
        done
    done
    local ns
    for ns in "${hosts[@]}" "$bridge_ns"; do
        if [[ -e /run/netns/$ns ]]; then ip netns del "$ns"; fi
    done
    if [[ -d $state ]]; then
        local f
        for f in "$state"/uts/*; do
            [[ -e $f ]] || continue
            umount "$f" 2>/dev/null || true
        done
        rm -rf "$state"
    fi
    local left
    left=$(
        pids_on_hosts
        ip netns list | grep -E "^(mproc-h[0-9]+|$bridge_ns)( |$)" || true
        if [[ -e $state ]]; then echo "$state"; fi
    )
    [[ -z $left ]] || die "teardown left: $left"
}

up() {
    check_can_make_hosts
    down
    mkdir -p "$state/uts"
    ip netns add "$bridge_ns"
    ip -n "$bridge_ns" link add br0 type bridge
    ip -n "$bridge_ns" link set br0 up
    local i h
    for i in "${!hosts[@]}"; do
        h=${hosts[i]}
        ip netns add "$h"
        # A UTS namespace kept by a bind mount (no process needs to hold it), with the hostname
        # Open MPI and the ranks see on that host.
        touch "$state/uts/$h"
        unshare --uts="$state/uts/$h" hostname "$h"
        # The host's cable: one end (mproc0) in the host, the other a port of the bridge.
        ip -n "$bridge_ns" link add "h$((i + 1))" type veth peer name "$iface" netns "$h"
        if ((i == 0 && delay_ms > 0)); then
            delay_cable "$h"
        else
            ip -n "$bridge_ns" link set "h$((i + 1))" master br0 up
        fi
        ip netns exec "$h" sh -c "echo $tcp_retries2 >/proc/sys/net/ipv4/tcp_retries2"
        ip -n "$h" link set lo up
        ip -n "$h" addr add "$subnet.$((i + 1))/24" dev "$iface"
        ip -n "$h" link set "$iface" up
        if ((delay_ms > 0)); then ip netns exec "$h" ethtool -K "$iface" tx off tso off gso off gro off >/dev/null 2>&1 || true; fi
    done
    for h in "${hosts[@]}"; do echo "$h slots=1"; done >"$state/hostfile"
    echo "hosts.sh: ${hosts[*]} up ($subnet.1-${#hosts[@]} on $iface; hostfile $state/hostfile)"
    if ((delay_ms > 0)); then echo "hosts.sh: ${hosts[0]}'s cable delays every frame ${delay_ms} ms each way"; fi
}

# delay_cable HOST: HOST's cable (h1 in the bridge's namespace) reaches the bridge through
# delay_relay.py, which sends each frame on after MPROC_HOSTS_DELAY_MS: h1 <-> relay <-> d1 = d1b, a
# port of the bridge. Everything between host 1 (rank 0's) and the others is then that much slower
# each way — a slow link on a kernel without sch_netem. Segmentation offloads are off on every
# interface a frame can come from or go to (the relay sends frames no larger than the MTU).
delay_cable() {
    local h=$1 dev
    command -v ethtool >/dev/null 2>&1 || die "MPROC_HOSTS_DELAY_MS needs ethtool (Debian: ethtool)"
    ip -n "$bridge_ns" link add d1 type veth peer name d1b
    ip -n "$bridge_ns" link set d1b master br0 up
    for dev in h1 d1 d1b; do
        ip -n "$bridge_ns" link set "$dev" up
        ip netns exec "$bridge_ns" ethtool -K "$dev" tx off tso off gso off gro off >/dev/null 2>&1 || true
    done
    # (Hosts 2 and 3 turn theirs off as their interfaces come up, in `up`.)
    ip netns exec "$h" ethtool -K "$iface" tx off tso off gso off gro off >/dev/null 2>&1 || true
    setsid ip netns exec "$bridge_ns" python3 "$here/delay_relay.py" h1 d1 "$delay_ms" \
        </dev/null >"$state/delay_relay.log" 2>&1 &
}

# on_host HOST CMD...: CMD in HOST's namespaces, with this shell's environment (for the mpirun and
# ctest of host 1; agent.sh is what starts commands on the hosts for Open MPI).
on_host() {
    local h=$1
    shift
    [[ -e /run/netns/$h && -e $state/uts/$h ]] || die "no host $h: run 'hosts.sh up' first"
    nsenter --net="/run/netns/$h" --uts="$state/uts/$h" -- "$@"
}

# mpirun_on_hosts ARG...: mpirun on host 1, told to use the three hosts.
mpirun_on_hosts() {
    local args=(--hostfile "$state/hostfile") i
    for ((i = 0; i < ${#mca[@]}; i += 2)); do args+=(--mca "${mca[i]}" "${mca[i + 1]}"); done
    # As root (which namespaces need) Open MPI runs only when told that it is meant.
    on_host "${hosts[0]}" env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun "${args[@]}" "$@"
}

# limited SECONDS FUNCTION ARG...: runs the function in the background, killed (TERM, then KILL
# 10 s later) if it has not ended within SECONDS, and waits for it in a way a signal interrupts at
# once: bash runs a trap only after the foreground command ends, and Ctrl-C or a SIGTERM must tear
# the hosts down promptly. A timeout is a failure (status 124), so a hang cannot outlast the stage.
limited() {
    local seconds=$1
    shift
    timeout --kill-after=10 "$seconds" bash "${BASH_SOURCE[0]}" "$@" &
    wait "$!"
}

# run_on_hosts CMD...: CMD on host 1 with Open MPI's settings for the hosts in its environment, so
# that every mpirun it starts uses them, whatever its command line (ctest's MPI tests).
run_on_hosts() {
    local env=(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
        "OMPI_MCA_orte_default_hostfile=$state/hostfile") i
    for ((i = 0; i < ${#mca[@]}; i += 2)); do env+=("OMPI_MCA_${mca[i]}=${mca[i + 1]}"); done
    on_host "${hosts[0]}" env "${env[@]}" "$@"
}

# cut_test BUILD: host 3's cable is cut mid-map (its bridge port goes down). Rank 0 must see
# RankLost naming rank 2 on mproc-h3 within the heartbeat's 2 s (and some slack), the job must end,
# and nothing may be left on any host — the rank on the cut host leaves by itself, and mpirun and
# the daemons give their connections up by the settings above. The cable is mended after.
cut_test() {
    local build=$1 out="$state/cut" waited
    say "Host 3 cut off mid-map: RankLost within the heartbeat's timeout, and nothing left on any host"
    limited 180 mpirun -n 3 "$build/tests/mpi/mproc_mpi_failure_program" cut >"$out" 2>&1 &
    local job=$!
    for ((waited = 0; waited < 600; waited++)); do
        grep -q '^mapping' "$out" && break
        sleep 0.1
    done
    grep -q '^mapping' "$out" || { cat "$out"; die "the job did not start mapping within 60 s"; }
    sleep 1
    local t0=$SECONDS
    ip -n "$bridge_ns" link set h3 down
    for ((waited = 0; waited < 300; waited++)); do
        grep -q '^RankLost' "$out" && break
        sleep 0.1
    done
    local seen=$((SECONDS - t0))
    local status=0
    wait "$job" || status=$?
    local ended=$((SECONDS - t0))
    for ((waited = 0; waited < 600; waited++)); do
        [[ -z $(pids_on_hosts) ]] && break
        sleep 0.1
    done
    local left
    left=$(pids_on_hosts | xargs -r ps -o pid=,comm= -p || true)
    ip -n "$bridge_ns" link set h3 up
    cat "$out"
    grep -q '^RankLost: .*rank 2 (pid [0-9]* on host mproc-h3) lost: not heard from' "$out" ||
        die "rank 0 did not see RankLost for rank 2 on mproc-h3"
    echo "hosts.sh: RankLost seen about ${seen} s after the cut; the job ended (status $status) after ${ended} s"
    ((seen <= 10)) || die "RankLost came ${seen} s after the cut (the heartbeat's timeout is 2 s)"
    ((status != 0 && status != 124)) || die "the job ended with status $status (an error status was expected)"
    [[ -z $left ]] || die "left on the hosts 60 s after the job ended: $left"
}

run_test() {
    local build
    build=$(cd -- "$1" && pwd) || die "no build folder $1"
    [[ -x $build/tests/mpi/mpi_pool && -x $build/tests/mpi/test_mpi_pool ]] ||
        die "$build has no MPI tests built (MPI found at configure, then: cmake --build $build --target test_mpi_pool mproc_mpi_failure_program mpi_pool)"
    check_can_make_hosts
    local status=0 # set by the EXIT trap, which runs in this function's scope
    trap 'status=$?; down || status=1; exit "$status"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    local t0=$SECONDS
    say "Three hosts, each a network and a UTS namespace, joined by a bridge in namespace $bridge_ns"
    up
    local h
    for h in "${hosts[@]}"; do
        printf '%s: hostname %s, %s\n' "$h" "$("$here/agent.sh" "$h" hostname)" \
            "$(on_host "$h" ip -brief address show dev "$iface" | tr -s ' ')"
    done

    # Outputs go to files, not $(...): the shell would wait for a command substitution before it
    # ran a trap.
    say "mpirun -n 3 hostname: one rank on each host"
    limited 120 mpirun -n 3 hostname >"$state/hostnames"
    cat "$state/hostnames"
    [[ $(sort "$state/hostnames" | tr '\n' ' ') == "${hosts[*]} " ]] ||
        die "the ranks did not run one on each of ${hosts[*]}"

    say "The example across the hosts: mpirun -n 3 $build/tests/mpi/mpi_pool"
    limited 300 mpirun -n 3 "$build/tests/mpi/mpi_pool" >"$state/example"
    cat "$state/example"
    grep -q 'sum of squares below 100000: 333328333350000' "$state/example" ||
        die "the example's sum is wrong or missing"

    say "The MPI tests across the hosts: ctest -L mpi, Open MPI's settings in OMPI_MCA_* variables"
    # Each test has its own timeout (at most 600 s); the whole run is bounded too, so that a hang
    # between tests fails the stage rather than reaching the CI's time limit.
    # mpi.dladdr and mpi.buildid matter most here: ctest starts mpirun by its absolute path, so Open
    # MPI gives the other hosts LD_LIBRARY_PATH=/usr/lib: (its empty last entry is the working
    # folder, which holds the tests' library) and they load it by its bare name, not rank 0's path.
    limited 900 run ctest --test-dir "$build" -L mpi -j1 --output-on-failure

    cut_test "$build"

    say "What each host sent and received on $iface since it was made (TCP between the hosts)"
    for h in "${hosts[@]}"; do
        # shellcheck disable=SC2016 # awk's own $ fields
        on_host "$h" awk -v h="$h" -v i="$iface:" \
            '$1 == i { printf "%s: received %d bytes, sent %d bytes\n", h, $2, $10 }' /proc/net/dev
    done
    say "Passed in $((SECONDS - t0)) s; removing the hosts"
}

(($# >= 1)) || usage
command=$1
shift
case $command in
    up) (($# == 0)) || usage; up ;;
    down) (($# == 0)) || usage; down ;;
    exec) (($# >= 2)) || usage; exec "$here/agent.sh" "$@" ;;
    mpirun) mpirun_on_hosts "$@" ;;
    run) (($# >= 1)) || usage; run_on_hosts "$@" ;;
    test) (($# == 1)) || usage; run_test "$1" ;;
    *) usage ;;
esac
