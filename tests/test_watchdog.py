"""The heartbeat watchdog (sapt_dist/distributed/watchdog.py) on a TCPStore in this
process: a peer that stops beating is reported within the timeout, named; a live one
never is; a store that goes away ends the rank too."""

from __future__ import annotations

import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from sapt_dist.distributed.watchdog import Watchdog


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store(port: int) -> dist.TCPStore:
    return dist.TCPStore(
        "127.0.0.1", port, 2, is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False
    )


def _watch(port: int, rank: int, timeout_s: float, fired: list) -> Watchdog:
    def lost(msg: str) -> None:
        fired.append((time.monotonic(), msg))

    w = Watchdog(rank, 2, "127.0.0.1", port, timeout_s, on_lost=lost)
    w.start()
    return w


def test_a_silent_peer_is_reported_within_the_timeout_by_rank_and_host():
    port = _port()
    server = _store(port)
    fired0: list = []
    fired1: list = []
    w0 = _watch(port, 0, 1.0, fired0)
    w1 = _watch(port, 1, 1.0, fired1)
    time.sleep(2.5)  # both beat: more than twice the timeout, nothing reported
    assert fired0 == [] and fired1 == []
    w1.stop()  # rank 1 falls silent (as a killed process or a cut link looks)
    t0 = time.monotonic()
    deadline = t0 + 5
    while not fired0 and time.monotonic() < deadline:
        time.sleep(0.05)
    w0.stop()
    assert fired0, "rank 0 never reported its silent peer"
    when, msg = fired0[0]
    assert when - t0 <= 1.0 + 3 * w0.period, when - t0
    assert "lost rank 1 on " + socket.gethostname() in msg and "127.0.0.1" in msg, msg
    assert "distributed.timeout_s=1" in msg
    del server


def test_a_loss_seen_by_one_rank_ends_the_others_at_once():
    port = _port()
    server = _store(port)
    fired: list = []
    w = _watch(port, 1, 30.0, fired)
    client = dist.PrefixStore(
        "sapt-heartbeat",
        dist.TCPStore("127.0.0.1", port, 2, is_master=False, wait_for_workers=False),
    )
    client.set("lost", "rank 2 reports: lost rank 3 on nodeX")
    deadline = time.monotonic() + 5
    while not fired and time.monotonic() < deadline:
        time.sleep(0.05)
    w.stop()
    assert fired and "lost rank 3 on nodeX" in fired[0][1], fired
    del server


def test_an_unreachable_store_ends_the_rank():
    port = _port()
    ready = threading.Event()
    box: dict = {}

    def serve() -> None:
        box["store"] = _store(port)
        ready.set()

    threading.Thread(target=serve).start()
    ready.wait(5)
    fired: list = []
    w = _watch(port, 1, 1.0, fired)
    del box["store"]  # the master's store goes away (rank 0's node lost)
    deadline = time.monotonic() + 8
    while not fired and time.monotonic() < deadline:
        time.sleep(0.05)
    w.stop()
    assert fired and "has not answered" in fired[0][1], fired


GLOO_RESET = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
    "[10.78.0.12]:41089: Connection reset by peer. This is typically caused by a remote "
    "worker hanging or bugs in the application."
)


def test_a_closed_connection_names_the_peer_and_exits_as_a_loss(monkeypatch, tmp_path):
    """A crashed node's kernel closes its sockets: gloo raises 'Connection reset by peer'
    before the heartbeats can tell (the case a node crash gives). The uncaught error
    still ends the rank as a lost peer (exit 69, the marker written), naming the rank on
    that address once its heartbeats stop; an error that is no transport error does not."""
    from sapt_dist.distributed import watchdog as wd

    assert wd.transport_peer(GLOO_RESET) == "10.78.0.12"
    assert wd.transport_peer("CUDA out of memory") is None
    port = _port()
    store = _store(port)
    exits, fired = [], []
    monkeypatch.setattr(wd, "_exit", exits.append)
    w0 = _watch(port, 0, 2.0, fired)
    w1 = _watch(port, 1, 2.0, fired)
    try:
        time.sleep(1.0)  # both beat; rank 0 records rank 1's host ("vm (127.0.0.1)")
        monkeypatch.setattr(wd, "_ACTIVE", w0)
        monkeypatch.setattr(sys, "excepthook", lambda *a: None)  # no traceback printed
        monkeypatch.setenv(wd.LOST_MARKER_ENV, str(tmp_path / "lost"))
        wd._install_excepthook()
        hook = sys.excepthook
        hook(RuntimeError, RuntimeError("shape mismatch"), None)
        assert exits == []  # a bug is not a lost node
        w1.stop()  # rank 1's node crashed: no heartbeat from now on
        # its address is rank 1's: named at once
        t0 = time.monotonic()
        hook(RuntimeError, RuntimeError(GLOO_RESET.replace("10.78.0.12", "127.0.0.1")), None)
        assert exits == [wd.EXIT_PEER_LOST] and time.monotonic() - t0 < 1.0
        said = (tmp_path / "lost").read_text()
        assert said.startswith("a collective failed (RuntimeError): lost rank 1 on "), said
        assert "(127.0.0.1) (its connection closed mid-collective" in said, said
        # an address no rank recorded: the heartbeats name it within 3 periods
        t0 = time.monotonic()
        hook(RuntimeError, RuntimeError(GLOO_RESET), None)
        took = time.monotonic() - t0
        assert exits == [wd.EXIT_PEER_LOST] * 2
        assert took <= 3 * w0.period + 1.5, took
        said = (tmp_path / "lost").read_text().splitlines()[-1]
        assert "lost rank 1 on " in said and "(127.0.0.1) (last heard" in said, said
        assert wd._describe_address("10.9.9.9").startswith("the peer at 10.9.9.9 (its conn")
    finally:
        w0.stop()
        w1.stop()
        del store  # the store server lives until here
