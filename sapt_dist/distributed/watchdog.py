"""A rank whose peer is gone ends within ``distributed.timeout_s``, saying which peer.

Why not the process group's timeout alone: it is passed too (``init_process_group`` and
DeepSpeed's ``init_distributed``), and gloo honours it for a cut link (measured on the
2-node local cluster: ``Timed out waiting 10000ms for recv operation`` 10.0 s after
node2's veth went down, no TCP reset needed), but

- its error names no peer ("Timed out waiting ... for recv operation");
- it bounds one collective, and only where a collective is running: a rank can also be
  stuck elsewhere (a store lookup, NCCL without async error handling);
- a collective may legitimately wait long for a live peer (rank 0 writing a report).

So every rank also runs a heartbeat thread: each ``period`` seconds it bumps its counter
in the rendezvous store (a client of its own on ``MASTER_ADDR:MASTER_PORT``) and reads
the others'. A peer whose counter has not moved for ``timeout_s`` (its process killed,
its node's link down, its node off), or a store that has not answered for ``timeout_s``
(the master's node lost, or this node cut off), ends this rank: the error names the
rank(s) and host(s) not heard from, rank 0 writes the ``SAPT_LOST_MARKER`` file when
the batch script set one, and the process exits with :data:`EXIT_PEER_LOST` (without a
checkpoint: the last one written, atomically, stays as it was). A live peer busy in
long work keeps beating (the thread needs only the GIL now and then), so slow is not lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

__all__ = ["EXIT_PEER_LOST", "LOST_MARKER_ENV", "Watchdog", "lost_peers_hint", "start", "stop"]

log = logging.getLogger(__name__)

#: exit code of a rank that ended because a peer was lost (69 = EX_UNAVAILABLE)
EXIT_PEER_LOST = 69
#: a file the rank that detects a lost peer writes its message to (the batch scripts set
#: it, on the submit directory: the batch shell reports it and stops waiting for srun)
LOST_MARKER_ENV = "SAPT_LOST_MARKER"


class Watchdog:
    """Heartbeats of every rank through a TCPStore; see the module docstring.

    Args:
        rank, world: this process and the group size.
        host, port: the rendezvous store (MASTER_ADDR / MASTER_PORT).
        timeout_s: a peer unheard for this long is lost.
        on_lost: called with the message (default: log, marker, ``os._exit``).
    """

    def __init__(
        self,
        rank: int,
        world: int,
        host: str,
        port: int,
        timeout_s: float,
        on_lost=None,
    ) -> None:
        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        self.period = max(0.2, min(5.0, self.timeout_s / 5))
        self._addr = (host, port)
        self._on_lost = on_lost or _end_process
        self._stop = threading.Event()
        self._seen: dict[int, tuple[int, float]] = {}  # peer -> (counter, when it moved)
        self._hosts: dict[int, str] = {}
        self._store_ok = time.monotonic()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import torch.distributed as dist

        host, port = self._addr
        # a client of its own: the main thread's store calls must never wait behind ours
        store = dist.TCPStore(
            host,
            port,
            self.world,
            is_master=False,
            timeout=timedelta(seconds=max(1.0, self.period * 2)),
            wait_for_workers=False,
        )
        self._store = dist.PrefixStore("sapt-heartbeat", store)
        me = f"{socket.gethostname()} ({_own_address(host, port)})"
        self._store.set(f"host/{self.rank}", me)
        self._store.set(f"beat/{self.rank}", "0")
        now = time.monotonic()
        # each rank watches its ring neighbours (all peers in a small group): store traffic
        # stays O(world) per period; a loss is broadcast through the "lost" key
        peers = set(range(self.world)) if self.world <= 8 else {self.rank - 1, self.rank + 1}
        self._seen = {r % self.world: (-2, now) for r in peers if r % self.world != self.rank}
        self._thread = threading.Thread(target=self._loop, name="sapt-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def lost(self, now: float | None = None) -> list[int]:
        """Peers not heard from for more than 3 periods (a hint, for error messages)."""
        now = time.monotonic() if now is None else now
        return [r for r, (_, t) in self._seen.items() if now - t > 3 * self.period]

    def describe(self, ranks: list[int], now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        return ", ".join(
            f"rank {r} on {self._hosts.get(r, '?')} (last heard {now - self._seen[r][1]:.0f} s ago)"
            for r in ranks
        )

    def _loop(self) -> None:
        beat = 0
        while not self._stop.wait(self.period):
            beat += 1
            now = time.monotonic()
            try:
                self._store.set(f"beat/{self.rank}", str(beat))
                if self._store.check(["lost"]):  # another rank saw a loss first
                    self._fire(f"rank {self.rank}: " + self._store.get("lost").decode())
                    return
                for r in self._seen:
                    key = f"beat/{r}"
                    # get() would wait for a key a starting peer has not written yet
                    count = int(self._store.get(key)) if self._store.check([key]) else -1
                    if count != self._seen[r][0]:
                        self._seen[r] = (count, now)
                    if r not in self._hosts and self._store.check([f"host/{r}"]):
                        self._hosts[r] = self._store.get(f"host/{r}").decode()
                self._store_ok = now
            except Exception as e:  # the store did not answer in time (or its node is gone)
                if now - self._store_ok > self.timeout_s:
                    host, port = self._addr
                    self._fire(
                        f"rank {self.rank}: the rendezvous store on {host}:{port} (rank 0's "
                        f"node) has not answered for {now - self._store_ok:.0f} s "
                        f"(distributed.timeout_s={self.timeout_s:g}): rank 0's node or this "
                        f"node's link is gone ({type(e).__name__})"
                    )
                    return
                continue
            gone = [r for r, (_, t) in self._seen.items() if now - t > self.timeout_s]
            if gone:
                what = (
                    f"lost {self.describe(gone, now)}: no heartbeat for longer than "
                    f"distributed.timeout_s={self.timeout_s:g} (its process killed, its node "
                    f"down or its link cut)"
                )
                with contextlib.suppress(Exception):  # every other rank leaves at once too
                    self._store.set("lost", f"rank {self.rank} reports: {what}")
                self._fire(f"rank {self.rank}: {what}")
                return

    def _fire(self, message: str) -> None:
        if not self._stop.is_set():
            self._on_lost(message)


def _own_address(host: str, port: int) -> str:
    """The address this node reaches the master from (what gloo and NCCL pick too)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # UDP: no packet is sent, only the route is looked up
        return s.getsockname()[0]
    return "?"


#: how a rank ends when a peer is lost: ``launch`` installs its ``_exit_now`` (flush the
#: logs, let W&B finish, ``os._exit``); this module imports nothing of the package
_exit: Callable[[int], None] = os._exit


def set_exit(fn: Callable[[int], None]) -> None:
    """How this rank ends when a peer is lost (``launch`` sets it at import)."""
    global _exit
    _exit = fn


def _end_process(message: str) -> None:
    log.error("%s; ending this rank (exit %d)", message, EXIT_PEER_LOST)
    marker = os.environ.get(LOST_MARKER_ENV)
    if marker:
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(marker) or ".", exist_ok=True)
            with open(marker, "a") as f:
                f.write(message + "\n")
    _exit(EXIT_PEER_LOST)


_ACTIVE: Watchdog | None = None


def start(rank: int, world: int, host: str, port: int, timeout_s: float) -> Watchdog | None:
    """Start the heartbeat thread of this rank (no-op in one process)."""
    global _ACTIVE
    if world <= 1:
        return None
    stop()
    _ACTIVE = Watchdog(rank, world, host, port, timeout_s)
    _ACTIVE.start()
    _install_excepthook()
    return _ACTIVE


def stop() -> None:
    """Stop the heartbeats (before a planned exit: peers leaving is not a loss then)."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.stop()
        _ACTIVE = None


def lost_peers_hint() -> str:
    """Peers the watchdog has not heard from lately ('' when none or none running)."""
    w = _ACTIVE
    if w is None:
        return ""
    gone = w.lost()
    return w.describe(gone) if gone else ""


def _install_excepthook() -> None:
    """A collective that fails first (gloo's own timeout, a connection closed by the
    dead peer) ends the process through the uncaught exception: name the peer there too,
    and exit with :data:`EXIT_PEER_LOST`."""
    previous = sys.excepthook
    if getattr(previous, "_sapt_watchdog", False):
        return

    def hook(kind, value, tb):
        previous(kind, value, tb)
        if not issubclass(kind, RuntimeError | ConnectionError):
            return
        hint = lost_peers_hint()
        peer = transport_peer(str(value))
        if not hint and peer is not None:
            # the peer's kernel closed the connection (its process or node died) sooner
            # than the heartbeats can tell: the rank(s) at that address, or else a few
            # periods for the heartbeats to name it
            hint = _ranks_at(peer) or _wait_for_hint() or _describe_address(peer)
        if hint:
            _end_process(f"a collective failed ({kind.__name__}): lost {hint}")

    hook._sapt_watchdog = True  # type: ignore[attr-defined]
    sys.excepthook = hook


#: words of a transport error of gloo (or a socket under it): what a rank reads when its
#: peer's process or node went away mid-collective
_PEER_ADDRESS = re.compile(r"\[([0-9A-Za-z.:_-]+)\]:\d+")
_PEER_WORDS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Socket Timeout",
    "Connection refused",
    "No route to host",
)


def transport_peer(message: str) -> str | None:
    """The peer's address in a gloo transport error ('Read error [10.0.0.2]:41089:
    Connection reset by peer'), or None when ``message`` is not one."""
    if not any(w in message for w in _PEER_WORDS):
        return None
    m = _PEER_ADDRESS.search(message)
    return m.group(1) if m else "?"


def _wait_for_hint() -> str:
    w = _ACTIVE
    if w is None:
        return ""
    deadline = time.monotonic() + 3 * w.period + 1.0
    while time.monotonic() < deadline:
        hint = lost_peers_hint()
        if hint:
            return hint
        time.sleep(min(0.5, w.period))
    return ""


def _ranks_at(addr: str) -> str:
    """The rank(s) whose recorded host has ``addr`` ('' when none is known)."""
    w = _ACTIVE
    known = [] if w is None else [(r, h) for r, h in sorted(w._hosts.items()) if f"({addr})" in h]
    if not known:
        return ""
    who = ", ".join(f"rank {r} on {h}" for r, h in known)
    return f"{who} (its connection closed mid-collective: its process or node ended)"


def _describe_address(addr: str) -> str:
    return _ranks_at(addr) or (
        f"the peer at {addr} (its connection closed mid-collective: its process or node ended)"
    )
