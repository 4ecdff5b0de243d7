"""The frame judgement: bad frames are found with the right reason, good stacks raise no alarm."""

from __future__ import annotations

import numpy as np
import pytest

from nrrn_daemon.config.profiles import FrameSettings
from nrrn_daemon.frames import LiveJudge, inspect_frame, judge_stack
from nrrn_daemon.sim.noise import PROTOCOL_LEVELS, noisy_stack
from nrrn_daemon.sim.phantom import make_phantom

SETTINGS = FrameSettings()
BLANK, CUT, UNRELATED = 5, 10, 15


def bad_stack(fib25: np.ndarray, spec: str = "poisson:4") -> np.ndarray:
    """A noisy FIB-25 crop with a blank slice, one cut short, and one from another place."""
    clean = fib25[:20, :96, :96].copy()
    clean[UNRELATED] = fib25[28, 140:236, 140:236]  # another slice, another place
    stack = noisy_stack(clean, spec, seed=1)
    stack[BLANK] = 0
    stack[CUT, 48:] = 0
    return stack


def reasons(verdicts) -> dict[int, str]:
    return {i: v.reason for i, v in verdicts.items() if not v.usable}


def test_each_bad_frame_is_found_with_its_reason(fib25):
    stack = bad_stack(fib25)
    found = reasons(judge_stack(range(len(stack)), stack.__getitem__, SETTINGS))
    assert sorted(found) == [BLANK, CUT, UNRELATED]
    assert found[BLANK].startswith("blank frame")
    assert found[CUT].startswith("frame cut short (50% of rows")
    assert found[UNRELATED].startswith("unrelated to its neighbours")


def test_intrinsic_verdicts():
    rng = np.random.default_rng(0)
    good = rng.integers(0, 200, (64, 64), dtype=np.uint8)
    assert inspect_frame(good, SETTINGS).usable
    blank = inspect_frame(np.full((64, 64), 7, np.uint8), SETTINGS)
    assert (blank.usable, blank.has_signal, blank.label) == (
        False,
        False,
        "unusable: " + blank.reason,
    )
    saturated = good.copy()
    saturated[:40] = 255
    verdict = inspect_frame(saturated, SETTINGS)
    assert not verdict.usable and verdict.reason.startswith("saturated frame")
    columns = good.copy()
    columns[:, 40:] = 3
    verdict = inspect_frame(columns, SETTINGS)
    assert verdict.reason == "frame cut short (38% of columns constant)" and verdict.has_signal
    assert inspect_frame(np.zeros((8, 8), np.uint8), FrameSettings(enabled=False)).usable


def test_live_judge_agrees_with_the_whole_stack_judgement(fib25):
    stack = bad_stack(fib25)
    judge = LiveJudge(SETTINGS, wait_s=60)
    final = {}
    for i, pixels in enumerate(stack):
        for index, verdict in judge.add(i, pixels, now=float(i)):
            assert index not in final, "a verdict is final once"
            final[index] = verdict
    for index, verdict in judge.release():
        final[index] = verdict
    assert sorted(final) == list(range(len(stack)))
    assert reasons(final).keys() == {BLANK, CUT, UNRELATED}
    assert reasons(final)[UNRELATED].startswith("unrelated")


def test_a_held_slice_is_released_after_the_wait(fib25):
    stack = bad_stack(fib25)
    judge = LiveJudge(SETTINGS, wait_s=60)
    for i in range(UNRELATED + 1):
        judge.add(i, stack[i], now=0.0)
    assert judge.held == [UNRELATED]  # unlike slice 14; slice 16 not in yet
    assert judge.next_deadline() == 60.0
    assert judge.release(now=30.0) == []
    assert [(i, v.usable) for i, v in judge.release(now=60.0)] == [(UNRELATED, True)]


def test_a_reacquired_frame_is_judged_again(fib25):
    stack = bad_stack(fib25)
    judge = LiveJudge(SETTINGS, wait_s=60)
    for i in range(BLANK + 2):
        judge.add(i, stack[i], now=0.0)
    retake = noisy_stack(fib25[BLANK : BLANK + 1, :96, :96], "poisson:4", seed=9)[0]
    assert [(i, v.usable) for i, v in judge.add(BLANK, retake, now=1.0)] == [(BLANK, True)]


@pytest.mark.parametrize("spec", PROTOCOL_LEVELS)
def test_no_false_alarm_on_a_noisy_phantom(spec):
    stack = noisy_stack(make_phantom((24, 128, 128), seed=3), spec, seed=2)
    assert reasons(judge_stack(range(len(stack)), stack.__getitem__, SETTINGS)) == {}
    judge = LiveJudge(SETTINGS, wait_s=60)
    live = [v for i, s in enumerate(stack) for _, v in judge.add(i, s, now=0.0)]
    live += [v for _, v in judge.release()]
    assert len(live) == len(stack) and all(v.usable for v in live)


@pytest.mark.parametrize("spec", [None, *PROTOCOL_LEVELS])
def test_no_false_alarm_on_the_fib25_volume(fib25, spec):
    stack = fib25 if spec is None else noisy_stack(fib25[:, :128, :128], spec, seed=4)
    assert reasons(judge_stack(range(len(stack)), stack.__getitem__, SETTINGS)) == {}


def test_no_false_alarm_on_the_whole_shared_volume(fib25_volume):
    """All 250 slices of the shared FIB-25 volume, clean: none is judged unusable."""
    stack = fib25_volume
    assert reasons(judge_stack(range(len(stack)), stack.__getitem__, SETTINGS)) == {}
