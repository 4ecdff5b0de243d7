"""The grouping core: triplets, edges, gaps, redos, repeat scans, restarts and bounded memory."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nrrn_daemon.config.profiles import GroupingSettings
from nrrn_daemon.errors import InputError
from nrrn_daemon.slices import SliceRef
from nrrn_daemon.triplets import TripletGrouper, Work, WorkMode

WAIT = 10.0


def ref(index: int, scan: int | None = None, folder: str = "/acq") -> SliceRef:
    name = f"s{index:05d}.tif" if scan is None else f"s{index:05d}_scan{scan}.tif"
    return SliceRef(Path(folder) / name, name, index, scan)


def summary(works: list[Work]) -> list[tuple[int, str, tuple[int, ...], bool]]:
    """(centre, mode, neighbour indices or scans, redo) of each work, for compact asserts."""
    return [
        (
            w.index,
            w.mode.value,
            tuple(n.index if n.scan is None else n.scan for n in w.neighbours),
            w.redo,
        )
        for w in works
    ]


def feed(grouper: TripletGrouper, indices: list[int], now: float = 0.0) -> list[Work]:
    return [w for i in indices for w in grouper.add(ref(i), now)]


# -- adjacent mode ------------------------------------------------------------------------------


def test_in_order_triplets_as_soon_as_both_neighbours_are_in() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    assert feed(g, [1, 2]) == []
    assert summary(g.add(ref(3), 0)) == [(2, "triplet", (1, 3), False)]
    assert summary(feed(g, [4, 5])) == [
        (3, "triplet", (2, 4), False),
        (4, "triplet", (3, 5), False),
    ]
    assert g.pending == [1, 5]


def test_triplet_neighbours_are_prev_then_next_whatever_the_order() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    assert feed(g, [8, 6]) == []
    (work,) = g.add(ref(7), 0)
    assert work.centre == ref(7) and work.neighbours == (ref(6), ref(8))
    assert work.mode is WorkMode.TRIPLET and work.mode == "triplet"


def test_edges_resolve_through_the_wait() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    feed(g, [1, 2, 3], now=100.0)
    assert g.next_deadline() == 100.0 + WAIT
    assert g.tick(100.0 + WAIT - 0.1) == []
    assert summary(g.tick(100.0 + WAIT)) == [(1, "pair", (2,), False), (3, "pair", (2,), False)]
    assert g.pending == [] and g.next_deadline() is None


def test_lone_slice_becomes_single() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    g.add(ref(5), 0)
    assert summary(g.tick(WAIT)) == [(5, "single", (), False)]


def test_wait_counts_from_each_slice_becoming_ready() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    g.add(ref(1), 0.0)
    g.add(ref(2), 5.0)
    assert summary(g.tick(WAIT)) == [(1, "pair", (2,), False)]
    assert summary(g.tick(5.0 + WAIT)) == [(2, "pair", (1,), False)]


def test_gap_waits_then_pairs_then_redoes_as_triplet() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    assert summary(feed(g, [1, 2, 4, 5])) == []
    assert summary(g.tick(WAIT)) == [
        (1, "pair", (2,), False),
        (2, "pair", (1,), False),
        (4, "pair", (5,), False),
        (5, "pair", (4,), False),
    ]
    assert summary(g.add(ref(3), WAIT + 1)) == [
        (2, "triplet", (1, 3), True),
        (3, "triplet", (2, 4), False),
        (4, "triplet", (3, 5), True),
    ]


def test_an_unusable_slice_is_never_a_neighbour() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    works = feed(g, [1, 2]) + g.add_unusable(ref(3)) + feed(g, [4, 5, 6])
    assert summary(works) == [
        (2, "pair", (1,), False),  # at once: its other side is settled
        (4, "pair", (5,), False),
        (5, "triplet", (4, 6), False),
    ]
    assert all(3 not in [n.index for n in w.neighbours] for w in works)
    assert g.pending == [1, 6]  # the edges wait as always; the unusable slice is not pending
    assert summary(g.flush()) == [(1, "pair", (2,), False), (6, "pair", (5,), False)]


def test_a_run_of_unusable_slices_leaves_its_neighbours_single() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    works = g.add_unusable(ref(1)) + feed(g, [2]) + g.add_unusable(ref(3))
    assert summary(works) == [(2, "single", (), False)]


def test_a_reacquired_frame_replaces_the_unusable_one_and_its_neighbours_are_redone() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    feed(g, [1, 2])
    g.add_unusable(ref(3))
    feed(g, [4, 5])
    retake = SliceRef(Path("/acq/s00003_retake.tif"), "s00003_retake.tif", 3)
    works = g.add(retake, 1.0)
    assert summary(works) == [
        (2, "triplet", (1, 3), True),
        (3, "triplet", (2, 4), False),
        (4, "triplet", (3, 5), True),
    ]
    assert works[1].centre is retake
    same_path = TripletGrouper(neighbour_wait_s=WAIT)
    feed(same_path, [1])
    same_path.add_unusable(ref(2))
    feed(same_path, [3])
    assert summary(same_path.add(ref(2), 1.0)) == [(2, "triplet", (1, 3), False)]


def test_gap_without_redo() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT, redo_as_triplet=False)
    feed(g, [1, 2, 4, 5])
    g.tick(WAIT)
    assert summary(g.add(ref(3), WAIT + 1)) == [(3, "triplet", (2, 4), False)]


def test_flush_emits_everything_pending_with_what_it_has() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    feed(g, [1, 2, 3, 7])
    assert summary(g.flush()) == [
        (1, "pair", (2,), False),
        (3, "pair", (2,), False),
        (7, "single", (), False),
    ]
    assert g.flush() == [] and g.tick(1e9) == []


def test_duplicate_add_is_ignored() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    feed(g, [1, 2, 3])
    assert feed(g, [1, 2, 3]) == []
    assert g.pending == [1, 3]


def test_replacement_file_takes_the_place_of_the_old_one() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    feed(g, [1, 2])
    newer = ref(2, folder="/acq/retake")
    assert g.add(newer, 1.0) == []
    (work,) = g.add(ref(3), 2.0)
    assert work.centre == newer
    (edge,) = g.tick(WAIT)  # slice 1 waited since t=0
    assert edge.neighbours == (newer,)


def test_restart_seeding_redoes_pairs_when_the_neighbour_comes() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    for i in range(1, 5):
        assert g.add_done(ref(i), "triplet" if 1 < i < 4 else "pair") == []
    assert g.pending == []
    assert summary(g.add(ref(5), 0)) == [(4, "triplet", (3, 5), True)]
    assert g.pending == [5]


def test_seeding_that_completes_a_missed_redo_emits_it() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    g.add_done(ref(1), WorkMode.TRIPLET)
    g.add_done(ref(3), WorkMode.TRIPLET)
    assert summary(g.add_done(ref(2), WorkMode.PAIR)) == [(2, "triplet", (1, 3), True)]


def test_seeded_neighbour_completes_a_pending_slice() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    feed(g, [2, 3])
    assert summary(g.add_done(ref(1), "triplet")) == [(2, "triplet", (1, 3), False)]


@pytest.mark.parametrize("redo", [True, False])
@pytest.mark.parametrize("tick_every", [0, 1, 50])
def test_memory_stays_bounded_over_a_long_acquisition(redo: bool, tick_every: int) -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT, redo_as_triplet=redo)
    emitted = 0
    for i in range(10_000):
        now = float(i)
        emitted += len(g.add(ref(i), now))
        if tick_every and i % tick_every == 0:
            emitted += len(g.tick(now))
        assert g.state_size <= 8, (i, g.state_size)
    emitted += len(g.flush())
    assert g.state_size <= 8
    assert emitted == 10_000


def test_memory_bounded_with_gaps_that_stay_open() -> None:
    g = TripletGrouper(neighbour_wait_s=1.0)
    for i in range(3000):
        if i % 100 == 50:
            continue  # a slice the microscope never wrote
        g.add(ref(i), float(i))
        g.tick(float(i))
    g.flush()
    assert g.state_size <= 5 * 30 + 10  # a few slices around each of the 30 open gaps


def test_late_report_of_a_forgotten_slice_is_ignored() -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    feed(g, list(range(10)))
    assert 3 not in g._slots  # finished and forgotten
    assert g.add(ref(3), 1.0) == [] and g.add(ref(3, folder="/elsewhere"), 1.0) == []


def test_zero_wait_emits_on_the_next_tick() -> None:
    g = TripletGrouper(neighbour_wait_s=0)
    g.add(ref(1), 0)
    assert summary(g.tick(0)) == [(1, "single", (), False)]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        TripletGrouper("triplets")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="neighbour_wait_s"):
        TripletGrouper(neighbour_wait_s=-1)
    with pytest.raises(ValueError, match="scans_per_slice"):
        TripletGrouper(scans_per_slice=1)


def test_from_settings() -> None:
    g = TripletGrouper.from_settings(GroupingSettings(neighbour_wait_s=3, redo_as_triplet=False))
    assert (g.mode, g.neighbour_wait_s, g.redo_as_triplet) == ("adjacent", 3.0, False)


# -- repeat-scans mode --------------------------------------------------------------------------


def test_repeat_group_emits_when_complete_centre_is_lowest_scan() -> None:
    g = TripletGrouper("repeat-scans", neighbour_wait_s=WAIT, scans_per_slice=3)
    assert g.add(ref(4, 3), 0) == [] and g.add(ref(4, 1), 0) == []
    (work,) = g.add(ref(4, 2), 0)
    assert work.centre == ref(4, 1) and work.neighbours == (ref(4, 2), ref(4, 3))
    assert work.mode is WorkMode.REPEAT and not work.redo
    assert g.add(ref(4, 4), 1) == []  # a scan beyond a complete group
    assert len(g) == 0


def test_repeat_group_times_out_then_redoes() -> None:
    g = TripletGrouper("repeat-scans", neighbour_wait_s=WAIT, scans_per_slice=3)
    g.add(ref(1, 1), 0)
    g.add(ref(1, 2), 0)
    g.add(ref(2, 1), 0)
    assert summary(g.tick(WAIT)) == [(1, "pair", (2,), False), (2, "single", (), False)]
    assert summary(g.add(ref(1, 3), WAIT + 1)) == [(1, "repeat", (2, 3), True)]


def test_repeat_group_without_redo_is_final_after_the_wait() -> None:
    g = TripletGrouper("repeat-scans", neighbour_wait_s=WAIT, redo_as_triplet=False)
    g.add(ref(1, 1), 0)
    g.tick(WAIT)
    assert g.add(ref(1, 2), WAIT + 1) == [] and len(g) == 0


def test_repeat_scans_need_a_scan_number() -> None:
    g = TripletGrouper("repeat-scans")
    with pytest.raises(InputError, match="no scan number"):
        g.add(ref(1), 0)


def test_repeat_memory_bounded() -> None:
    g = TripletGrouper("repeat-scans", neighbour_wait_s=WAIT, scans_per_slice=2)
    for i in range(5000):
        g.add(ref(i, 1), float(i))
        assert len(g.add(ref(i, 2), float(i))) == 1
    assert g.state_size <= 2


# -- properties ---------------------------------------------------------------------------------


def triplets_in_order(n: int) -> set[tuple[int, tuple[int, ...]]]:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    return {(w.index, tuple(x.index for x in w.neighbours)) for w in feed(g, list(range(n)))}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 25).flatmap(lambda n: st.permutations(list(range(n)))))
def test_any_arrival_order_gives_the_same_triplets(order: list[int]) -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT)
    works = feed(g, order)
    assert all(w.mode is WorkMode.TRIPLET and not w.redo for w in works)
    got = [(w.index, tuple(x.index for x in w.neighbours)) for w in works]
    assert len(got) == len(set(got))
    assert set(got) == triplets_in_order(len(order))
    assert {i for i, _ in got} == set(range(1, len(order) - 1))


@settings(max_examples=60, deadline=None)
@given(
    order=st.integers(1, 20).flatmap(lambda n: st.permutations(list(range(n)))),
    gaps=st.lists(st.floats(0, 2 * WAIT), min_size=20, max_size=20),
    redo=st.booleans(),
)
def test_any_timing_emits_each_slice_once_plus_redos(
    order: list[int], gaps: list[float], redo: bool
) -> None:
    g = TripletGrouper(neighbour_wait_s=WAIT, redo_as_triplet=redo)
    works: list[Work] = []
    now = 0.0
    for i, gap in zip(order, gaps, strict=False):
        now += gap
        works += g.tick(now)
        works += g.add(ref(i), now)
    works += g.flush()
    n = len(order)
    first = Counter(w.index for w in works if not w.redo)
    assert first == Counter(range(n))  # every slice exactly once, apart from redos
    last: dict[int, Work] = {}
    for w in works:
        if w.redo:
            assert (
                redo and last[w.index].mode is not WorkMode.TRIPLET and w.mode is WorkMode.TRIPLET
            )
        assert all(abs(x.index - w.index) == 1 for x in w.neighbours)
        assert [x.index for x in w.neighbours] == sorted(x.index for x in w.neighbours)
        last[w.index] = w
    if redo:  # every interior slice ends up denoised as a triplet
        assert all(last[i].mode is WorkMode.TRIPLET for i in range(1, n - 1))
    assert g.pending == []


@settings(max_examples=40, deadline=None)
@given(
    arrivals=st.lists(st.tuples(st.integers(0, 6), st.integers(1, 3)), max_size=40),
    redo=st.booleans(),
)
def test_repeat_groups_any_order(arrivals: list[tuple[int, int]], redo: bool) -> None:
    g = TripletGrouper(
        "repeat-scans", neighbour_wait_s=WAIT, redo_as_triplet=redo, scans_per_slice=3
    )
    works: list[Work] = []
    for t, (index, scan) in enumerate(arrivals):
        works += g.tick(float(t))
        works += g.add(ref(index, scan), float(t))
    works += g.flush()
    assert Counter(w.index for w in works if not w.redo) == Counter({i for i, _ in arrivals})
    for w in works:
        scans = [w.centre.scan, *(x.scan for x in w.neighbours)]
        assert scans == sorted(set(scans)) and all(x.index == w.index for x in w.neighbours)
        assert (w.mode is WorkMode.REPEAT) == (len(scans) == 3)
        if w.redo:
            assert redo and w.mode is WorkMode.REPEAT
