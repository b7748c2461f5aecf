"""Slurm's compressed list syntaxes, expanded: host lists (`gpu[001-004,007],login1`) and tasks per node (`4(x2),3`).

Pure string functions so that launch detection stays testable without a Slurm cluster. They follow what
`scontrol show hostnames` prints: zero padding is kept from the range start, several bracket groups in one name
multiply out (`r[1-2]n[1-2]` -> r1n1, r1n2, r2n1, r2n2), and order is kept (no sorting, no de-duplication).
"""

from __future__ import annotations

import re

from engine.errors import WideepError

_TASKS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def expand_hostlist(hostlist: str, *, source: str = "SLURM_JOB_NODELIST") -> list[str]:
    """`"gpu[001-002,007],login1"` -> `["gpu001", "gpu002", "gpu007", "login1"]`.

    source: the variable the text came from, named in error messages.
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip(), source):
        hosts.extend(_expand_item(item, source))
    if not hosts:
        raise WideepError(f"{source} is empty; run inside a Slurm allocation or pass --dist-init-addr host:port")
    return hosts


def expand_tasks_per_node(text: str, *, source: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """`"4(x2),3"` -> `[4, 4, 3]`: tasks on each node of the step, in node order."""
    counts: list[int] = []
    for item in text.strip().split(","):
        match = _TASKS_ITEM.match(item.strip())
        if match is None:
            raise WideepError(f"{source}={text!r} is not Slurm's tasks-per-node syntax (e.g. '4(x2),3')")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _split_top_level(text: str, source: str) -> list[str]:
    """Split on commas that are outside brackets: `a[1,3],b` -> `["a[1,3]", "b"]`."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise WideepError(f"{source}={text!r}: nested '[' in a host list")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise WideepError(f"{source}={text!r}: ']' without '['")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise WideepError(f"{source}={text!r}: '[' without ']'")
    items.append(text[start:])
    return [item for item in (s.strip() for s in items) if item]


def _expand_item(item: str, source: str) -> list[str]:
    """One comma-free host pattern, e.g. `rack[1-2]-n[01-02]`, to its hosts (leftmost group varies slowest)."""
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    tails = _expand_item(rest, source)
    return [prefix + value + tail for value in _expand_range_set(body, item, source) for tail in tails]


def _expand_range_set(body: str, item: str, source: str) -> list[str]:
    """`001-003,7` -> `["001", "002", "003", "7"]`; the width of a range's start sets its zero padding."""
    values: list[str] = []
    for part in body.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise WideepError(f"{source}: {item!r} has a bad range {part!r} (expected e.g. '001-004' or '7')")
        if not sep:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise WideepError(f"{source}: {item!r} has a decreasing range {part!r}")
        values.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return values
