"""No silent hangs: a per-process watchdog that names the rank a stuck or failed collective is waiting for.

Wrap every collective step in `watchdog.guard(step, what)`. Two daemon threads run beside the main thread:
- heartbeat: every `heartbeat_s` this rank writes `beat|seq|phase|label` to the rendezvous TCP store (its own client
  connection) and reads every other rank's entry. `seq` counts the guards entered so far; ranks run the same
  collectives in the same order, so a rank whose `seq` is behind has not reached the step the others wait in, and a
  rank whose `beat` stopped changing is dead or frozen.
- monitor: when a guard has been open longer than `timeout_s`, prints
  `rank R: step S (what) timed out after N s waiting for rank(s) ...; check that every rank is alive`
  and ends the process with `os._exit(DIST_FAILURE_EXIT_CODE)`: a thread blocked inside a collective cannot be
  interrupted, and a normal exit would wait for it.
A communication error raised inside a guard (gloo reports a dead peer at once as "Connection reset by peer") gets
the same diagnosis and exit, so a killed rank is named rather than reported as a socket address.

A one-process world has nobody to wait for: its guards only count steps.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TextIO

import torch.distributed as dist

if TYPE_CHECKING:
    from parallel.state import ParallelState

DIST_FAILURE_EXIT_CODE = 3
"""Exit status of a rank that gave up on a collective (distinct from 1, a crash, and 2, a user error)."""

_COMM_ERROR_MARKERS = ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out")


@dataclass
class _Open:
    """One open guard: what it waits on and since when (time.monotonic)."""

    step: object
    what: str
    since: float
    seq: int


@dataclass
class _Peer:
    """The last heartbeat entry read for one rank and when (monotonic, local clock) it last changed."""

    beat: int
    seq: int
    phase: str
    label: str
    changed_at: float


class Watchdog:
    """Ends this process with a message naming the missing rank when a guarded step outlives `timeout_s`.

    state: this rank's `ParallelState` (rank, world size and the rendezvous store's address are used).
    timeout_s: `--dist-timeout`; also the limit the process group itself was given.
    heartbeat_s: how often ranks publish and read liveness (default timeout/10, within 0.1-5 s); a rank silent for
        3 heartbeats is reported as dead or frozen.
    """

    def __init__(
        self,
        state: ParallelState,
        timeout_s: float,
        *,
        heartbeat_s: float | None = None,
        namespace: str | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.rank, self.world_size, self.timeout_s = state.rank, state.world_size, float(timeout_s)
        self.heartbeat_s = heartbeat_s or min(5.0, max(0.1, self.timeout_s / 10))
        self.stale_s = 3 * self.heartbeat_s
        self._addr, self._port = state.master_addr, state.master_port
        # torchrun reuses its agent's store across restarts; the restart count keeps attempts apart.
        self._prefix = namespace or f"wideep/watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._open: list[_Open] = []
        self._seq = 0
        self._last_label = "start-up"
        self._peers: dict[int, _Peer] = {}
        self._store_error: str | None = None
        self._started_at = time.monotonic()
        self._stop = threading.Event()
        self._failing = threading.Lock()
        self._threads: list[threading.Thread] = []

    # ---- life cycle -------------------------------------------------------------------------------------------

    def start(self) -> Watchdog:
        """Start the heartbeat and monitor threads (none for a one-process world). Returns self."""
        if self.world_size > 1 and not self._threads:
            self._started_at = time.monotonic()
            for name, target in (("heartbeat", self._heartbeat_loop), ("monitor", self._monitor_loop)):
                thread = threading.Thread(target=target, name=f"wideep-watchdog-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop the threads for good; call before tearing the process group (and so rank 0's store) down."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2 * self.heartbeat_s + 1)
        self._threads.clear()

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the guard ----------------------------------------------------------------------------------------------

    @contextmanager
    def guard(self, step: object, what: str) -> Iterator[None]:
        """Watch the block as `step` (e.g. a step number) doing `what` (e.g. "moe dispatch, layer 3").

        Guards nest: the outermost open guard must finish within `timeout_s`, and so must each inner one.
        Every rank must enter guards in the same order (they wrap collectives, which every rank joins).
        """
        with self._lock:
            self._seq += 1
            entry = _Open(step, what, time.monotonic(), self._seq)
            self._open.append(entry)
        try:
            yield
        except RuntimeError as err:
            if self.world_size > 1 and _is_comm_error(err):
                self._fail(entry, "failed", detail=_first_sentence(err))
            raise
        finally:
            with self._lock:
                self._open.remove(entry)
                self._last_label = _label(entry)

    # ---- threads ------------------------------------------------------------------------------------------------

    def _connect(self) -> dist.TCPStore:
        # Short op timeouts: a frozen store host must show up as an error here, not block this thread.
        return dist.TCPStore(
            self._addr, self._port, is_master=False, timeout=timedelta(seconds=max(1.0, 2 * self.heartbeat_s)),
            wait_for_workers=False,
        )

    def _key(self, rank: int) -> str:
        return f"{self._prefix}/{rank}"

    def _publish(self, store: dist.TCPStore, beat: int) -> None:
        """Write `beat|seq|phase|label`: phase "in" inside a guard (label: its step), "out" between guards."""
        with self._lock:
            current = self._open[-1] if self._open else None
            seq = self._seq
            label = _label(current) if current else f"after {self._last_label}"
        store.set(self._key(self.rank), f"{beat}|{seq}|{'in' if current else 'out'}|{label}")

    def _heartbeat_loop(self) -> None:
        store, beat, seen = None, 0, set()
        others = [r for r in range(self.world_size) if r != self.rank]
        while not self._stop.is_set():
            try:
                store = store or self._connect()
                beat += 1
                self._publish(store, beat)
                seen.update(r for r in others if r not in seen and store.check([self._key(r)]))
                ranks = sorted(seen)
                values = store.multi_get([self._key(r) for r in ranks]) if ranks else []
                now = time.monotonic()
                with self._lock:
                    for r, raw in zip(ranks, values, strict=True):
                        self._record(r, raw.decode(errors="replace"), now)
                    self._store_error = None
            except Exception as err:  # noqa: BLE001 - any store failure is a liveness fact, reported on failure
                with self._lock:
                    self._store_error = _first_sentence(err)
                store = None
            self._stop.wait(self.heartbeat_s)

    def _record(self, rank: int, raw: str, now: float) -> None:
        beat, seq, phase, label = (raw.split("|", 3) + ["", "", ""])[:4]
        old = self._peers.get(rank)
        changed = old is None or old.beat != int(beat)
        self._peers[rank] = _Peer(int(beat), int(seq), phase, label, now if changed else old.changed_at)

    def _monitor_loop(self) -> None:
        while not self._stop.wait(min(0.25, self.heartbeat_s / 2)):
            now = time.monotonic()
            with self._lock:
                expired = next((g for g in self._open if now - g.since > self.timeout_s), None)
            if expired is not None:
                self._fail(expired, "timed out")

    # ---- diagnosis ----------------------------------------------------------------------------------------------

    def suspects(self, seq: int) -> list[Suspect]:
        """Ranks that a guard with sequence number `seq` may be waiting for, most likely culprits first."""
        now = time.monotonic()
        found: list[Suspect] = []
        with self._lock:
            for r in range(self.world_size):
                peer = self._peers.get(r)
                if r == self.rank:
                    continue
                if peer is None:
                    if now - self._started_at > self.stale_s:
                        found.append(Suspect(r, "dead", "never sent a heartbeat: not started, dead or frozen"))
                elif peer.phase == "failed":
                    found.append(Suspect(r, "failed", f"gave up too, at {peer.label}"))
                elif now - peer.changed_at > self.stale_s:
                    found.append(Suspect(r, "dead", f"no heartbeat for {now - peer.changed_at:.1f} s: dead or frozen"))
                elif peer.seq < seq:
                    where = f"still at {peer.label}" if peer.phase == "in" else f"idle {peer.label}"
                    found.append(Suspect(r, "behind", f"alive but has not reached this step; {where}"))
            if self._store_error is not None:
                # The store lives in rank 0's process (or torchrun's agent): its silence points there.
                text = f"the rendezvous store at {self._addr}:{self._port} does not answer: {self._store_error}"
                found.append(Suspect(0, "store", text))
        order = {"dead": 0, "store": 1, "behind": 2, "failed": 3}
        return sorted(found, key=lambda s: order[s.kind])

    def _fail(self, entry: _Open, how: str, detail: str = "") -> None:
        """Print the diagnosis once and end the process; never returns."""
        if not self._failing.acquire(blocking=False):
            # The other thread is already reporting; wait for it to end the process.
            while True:
                time.sleep(60)
        elapsed = time.monotonic() - entry.since
        suspects = self.suspects(entry.seq)
        if how == "failed" and elapsed >= self.timeout_s:
            how = "timed out"  # the backend's own timeout beat the monitor to it: the same event
        if how == "failed":
            # The error arrives the moment a peer's socket closes, before its heartbeat has had time to go stale:
            # give the heartbeats a few beats to tell a dead rank from a slow one.
            deadline = time.monotonic() + self.stale_s + self.heartbeat_s
            while not any(s.kind in ("dead", "store") for s in suspects) and time.monotonic() < deadline:
                time.sleep(self.heartbeat_s / 4)
                suspects = self.suspects(entry.seq)
        with self._lock:
            inner = self._open[-1] if self._open else entry
        if suspects:
            waiting = ", ".join(f"{s.rank} ({s.text})" for s in suspects)
        else:
            waiting = "unknown (every rank sends heartbeats and has reached this step)"
        cause = f" ({detail})" if detail else ""
        message = (
            f"rank {self.rank}: step {entry.step} ({inner.what}) {how} after {elapsed:.1f} s{cause} "
            f"waiting for rank(s) {waiting}; check that every rank is alive"
        )
        try:
            if not any(s.kind == "store" for s in suspects):
                self._mark_failed(inner)
        finally:
            print(message, file=self._stream, flush=True)
            if self.rank == 0:
                self._linger_for_peers()
            os._exit(DIST_FAILURE_EXIT_CODE)

    def _linger_for_peers(self) -> None:
        """Rank 0's process hosts the rendezvous store (unless torchrun's agent does): keep it up while peers are still
        inside a guard (about to give up themselves), so their diagnoses read heartbeats rather than a dead store."""
        deadline = time.monotonic() + self.stale_s + 2 * self.heartbeat_s
        while time.monotonic() < deadline:
            now = time.monotonic()
            with self._lock:
                waiting = [
                    r for r in range(1, self.world_size)
                    if (p := self._peers.get(r)) is not None and p.phase == "in" and now - p.changed_at < self.stale_s
                ]
            if not waiting:
                return
            time.sleep(self.heartbeat_s / 4)

    def _mark_failed(self, entry: _Open) -> None:
        """Tell the others this rank is a victim, not the culprit, so their reports name the right rank.

        A fresh connection: the heartbeat thread's client is not shared across threads."""
        try:
            store = self._connect()
            store.set(self._key(self.rank), f"{1 << 62}|{entry.seq}|failed|{_label(entry)}")
        except Exception:  # noqa: BLE001 - best effort on the way out; the message below matters more
            pass


@dataclass(frozen=True)
class Suspect:
    """A rank a stuck step may be waiting for. kind: "dead" (heartbeat stopped), "store" (rendezvous store silent),
    "behind" (alive, has not reached the step), "failed" (gave up on its own step: a victim, listed last)."""

    rank: int
    kind: str
    text: str


def _label(entry: _Open) -> str:
    return f"step {entry.step} ({entry.what})"


def _first_sentence(err: BaseException) -> str:
    """`"[.../pair.cc:537] Read error [127.0.0.1]:8606: Connection reset by peer. This is typically..."` ->
    `"Read error [127.0.0.1]:8606: Connection reset by peer"`: the backend's own words, without source paths."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")


def _is_comm_error(err: BaseException) -> bool:
    """A distributed backend's error (gloo and NCCL raise plain RuntimeErrors that name themselves)."""
    return isinstance(err, dist.DistError) or any(marker in str(err) for marker in _COMM_ERROR_MARKERS)
