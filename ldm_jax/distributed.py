"""When one process of a multi-process run fails or dies, the others stop within seconds, naming it.

JAX's coordination service already aborts every process when a peer stops sending heartbeats (kill -9,
a lost host) -- after `heartbeat_timeout` seconds at most, sooner when the peer's connection drops. What it
does not handle is a peer that fails *in Python* (an exception, `sys.exit(1)` on one host only): that process
then waits in `jax.distributed.shutdown`'s barrier while the others wait in their next collective, and the
whole run hangs for `shutdown_timeout` (5 minutes) or, past it, forever. So here:
- a failing process publishes one line (`process 1 failed: DataError: ...`) in the coordination service's
  key-value store and leaves at once (`os._exit`, skipping the barrier);
- every process watches that store (and whether the service is still there) from a daemon thread and, on
  a failure, prints `ldm_jax: process 1 failed: ... -- stopping process 0 too; re-run the same command on
  every process to resume from the newest complete checkpoint` and exits with status `PEER_FAILED`.
A collective that fails because a peer's connection dropped (gloo names an address, not a rank) is not
reported as this process's own error: it waits, up to the heartbeat timeout, for the peer to be named.
`LDM_JAX_HEARTBEAT_TIMEOUT` (seconds, default 100, JAX's) bounds how long a silently lost host goes unnoticed.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import traceback
from typing import Callable

import jax
from jax._src import distributed as _jax_distributed  # the runtime client has no public handle

HEARTBEAT_ENV = "LDM_JAX_HEARTBEAT_TIMEOUT"
_PUBLISH_S = 5.0  # at most this long to publish a failure before exiting
PEER_FAILED = 75  # exit status of a process stopped because another one failed (EX_TEMPFAIL: re-run resumes)
_KEY = "ldm_jax/failed/"
_POLL_S = 1.0
_state = {"exiting": False, "watching": False}


def heartbeat_timeout() -> int:
    """Seconds without heartbeats after which JAX declares a process dead (`LDM_JAX_HEARTBEAT_TIMEOUT`)."""
    value = os.environ.get(HEARTBEAT_ENV, "100")
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise ValueError(f"{HEARTBEAT_ENV}={value!r} must be a whole number of seconds >= 1")
    return seconds


def client():
    """The coordination service's client of this process (key-value store, barriers); None when single-process."""
    return _jax_distributed.global_state.client


def _stop(message: str) -> None:
    if _state["exiting"]:
        return
    _state["exiting"] = True
    sys.stderr.write(f"ldm_jax: {message} -- stopping process {jax.process_index()} too; re-run the same command on "
                     "every process to resume from the newest complete checkpoint\n")
    sys.stderr.flush()
    os._exit(PEER_FAILED)


def _watch(client) -> None:
    # Only the key-value store is polled: the runtime's get_live_nodes is a barrier among the live processes.
    # A dead peer is JAX's own business (it aborts every process when heartbeats stop, naming the task).
    while not _state["exiting"]:
        time.sleep(_POLL_S)
        if _state["exiting"]:
            return
        try:
            failed = sorted(client.key_value_dir_get(_KEY))
        except Exception as e:  # noqa: BLE001 - any failure to reach the service means it is gone
            if not _state["exiting"]:
                _stop(f"lost the coordination service (process 0, {os.environ.get('JAX_COORDINATOR_ADDRESS', '')}):"
                      f" {' '.join(str(e).split())[:200]}")
            return
        if failed:
            _stop("; ".join(value for _, value in failed))


def fail(reason: str, code: int = 1) -> None:
    """Publishes `process N failed: reason` for the other processes and exits now, skipping the shutdown barrier."""
    me = jax.process_index()
    _state["exiting"] = True

    def publish() -> None:
        try:
            client().key_value_set(f"{_KEY}{me}", f"process {me} failed: {reason}")
        except Exception:  # noqa: BLE001 - the service may already be gone; exiting matters more
            pass

    # Bounded: when process 0 (which hosts the service) is already shutting down, the call can block for minutes.
    writer = threading.Thread(target=publish, name="ldm_jax-fail", daemon=True)
    writer.start()
    writer.join(_PUBLISH_S)
    if me == 0 and not writer.is_alive():  # the service lives in this process: give the others time to read it
        time.sleep(3 * _POLL_S)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


def _peer_failures() -> list[str] | None:
    """What other processes published as their failure; None when the coordination service is unreachable."""
    me = jax.process_index()
    try:
        return [value for key, value in sorted(client().key_value_dir_get(_KEY)) if key.rsplit("/", 1)[-1] != str(me)]
    except Exception:  # noqa: BLE001
        return None


_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "read error", "write error")


def _peer_connection_lost(value: BaseException) -> bool:
    """Whether a collective failed because a peer's connection dropped (gloo names an address, not a rank)."""
    seen = set()
    while value is not None and id(value) not in seen:
        seen.add(id(value))
        text = str(value).lower()
        if "gloo" in text and any(m in text for m in _PEER_LOST):
            return True
        value = value.__cause__ or value.__context__
    return False


def _await_peer_verdict(value: BaseException) -> None:
    """A peer dropped out of a collective: wait until it is named rather than report its death as our error.

    A peer that failed in Python publishes why (seconds); one that died (kill -9, a lost host) is named by JAX's
    heartbeat check, which aborts this process, within the heartbeat timeout. Returns if neither came."""
    wait = heartbeat_timeout() + 10
    sys.stderr.write(f"ldm_jax: process {jax.process_index()}: a collective lost its connection to a peer "
                     f"({' '.join(str(value).split())[:200]}); waiting up to {wait} s for the coordination "
                     "service to name the process that left\n")
    sys.stderr.flush()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        peers = _peer_failures()
        if peers:
            _stop("; ".join(peers))
        if peers is None:
            _stop("lost the coordination service (process 0)" if jax.process_index() != 0 else
                  "the coordination service stopped answering")
        time.sleep(_POLL_S)


def _excepthook(kind, value, tb) -> None:
    # A collective that failed because a peer left first (gloo: "Connection closed by peer") is that peer's failure.
    peers = _peer_failures()
    if peers:
        _stop("; ".join(peers))
    if peers == [] and _peer_connection_lost(value):
        _await_peer_verdict(value)
        peers = _peer_failures()
    if peers is None and jax.process_index() != 0:
        _stop("lost the coordination service (process 0)")
    traceback.print_exception(kind, value, tb)
    fail(f"{kind.__name__}: {' '.join(str(value).split())[:300]}")


def watch() -> None:
    """Starts the watchdog and the failure hook; `initialize_distributed` calls it after forming the cluster."""
    if _state["watching"] or jax.process_count() == 1:
        return
    _state["watching"] = True
    # A clean exit must not look like a failure to the peers still finishing: stop watching first.
    atexit.register(lambda: _state.update(exiting=True))
    sys.excepthook = _excepthook
    threading.Thread(target=_watch, args=(client(),),
                     name="ldm_jax-peer-watch", daemon=True).start()


def guard(main: Callable[[], object]) -> None:
    """Runs an entry point; in a multi-process run a non-zero `sys.exit` or an exception becomes `fail`."""
    try:
        main()
    except SystemExit as e:
        if jax.process_count() > 1 and e.code not in (None, 0):
            if not isinstance(e.code, int):
                sys.stderr.write(f"{e.code}\n")
            fail(" ".join(str(e.code).split())[:300], e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException as e:  # noqa: BLE001
        if jax.process_count() > 1 and not isinstance(e, KeyboardInterrupt):
            _excepthook(type(e), e, e.__traceback__)
        raise
