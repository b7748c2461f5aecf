"""No silent hangs: when one of 3 gloo ranks is killed or stops short of a collective, the others exit within
`--dist-timeout` with a message naming the missing rank and the step."""

from __future__ import annotations

import re

import pytest
from _parallel_ranks import describe, run_ranks

from parallel.watchdog import DIST_FAILURE_EXIT_CODE

TIMEOUT_S = 4.0
WORLD = 3


def hanging_run(mode: str):
    results = run_ranks(lambda rank, port: ["hang", mode, rank, WORLD, port, TIMEOUT_S], WORLD, timeout_s=90,
                        wait_for=range(WORLD - 1))
    hung = results[-1]
    match = re.search(r"hanging (\d+\.\d+)", hung.stdout)
    assert match, describe(results)
    return results, float(match.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kill", "sleep"])
def test_survivors_name_the_missing_rank_and_exit(mode):
    results, hung_at = hanging_run(mode)
    for r in results[:-1]:
        assert r.returncode == DIST_FAILURE_EXIT_CODE, describe(results)
        how = r"failed after \d+\.\d s \(.+\)" if mode == "kill" else r"timed out after 4\.\d s"
        assert re.search(rf"rank {r.rank}: step 3 \(all_reduce\) {how}", r.stderr), describe(results)
        # The missing rank is named first, with why; the other survivor may be listed after it as a fellow victim.
        assert "waiting for rank(s) 2 (" in r.stderr and "check that every rank is alive" in r.stderr, \
            describe(results)
        reason = "dead or frozen" if mode == "kill" else "alive but has not reached this step"
        assert reason in r.stderr, describe(results)
        # Within the timeout (plus scheduling slack on a busy 2-core machine), not a silent hang.
        assert r.ended_at - hung_at < TIMEOUT_S + 3, describe(results)
