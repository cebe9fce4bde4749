#!/usr/bin/env python3
"""A cable with a delay, in user space, for the simulated hosts of hosts.sh.

    delay_relay.py IFACE_A IFACE_B DELAY_MS

Every Ethernet frame that arrives on one interface goes out on the other DELAY_MS milliseconds
later, in order. hosts.sh (`up` with MPROC_HOSTS_DELAY_MS) runs it in the bridge's namespace between
host 1's cable and a port of the bridge, so everything between rank 0 and the other hosts is
delayed that much each way: a slow link where the kernel has no sch_netem (no `tc ... netem`).

The interfaces must have their segmentation offloads off (hosts.sh does it with ethtool): a frame
larger than the MTU cannot be sent through a packet socket. Standard library only; runs until
killed.
"""
import heapq
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003


def open_port(name):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((name, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)
    s.setblocking(False)
    return s


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    a, b = open_port(sys.argv[1]), open_port(sys.argv[2])
    delay = float(sys.argv[3]) / 1000.0
    other = {a: b, b: a}
    due = []  # (when, sequence, out, frame): a heap, FIFO among equal times
    sequence = 0
    while True:
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else None
        ready, _, _ = select.select([a, b], [], [], timeout)
        now = time.monotonic()
        for port in ready:
            while True:
                try:
                    frame, address = port.recvfrom(65536)
                except BlockingIOError:
                    break
                if address[2] == socket.PACKET_OUTGOING:  # our own send, seen on the way out
                    continue
                heapq.heappush(due, (now + delay, sequence, other[port], frame))
                sequence += 1
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, out, frame = heapq.heappop(due)
            try:
                out.send(frame)
            except (BlockingIOError, OSError):
                pass  # a full queue or a frame the link refuses: dropped, as a cable would


if __name__ == "__main__":
    main()
