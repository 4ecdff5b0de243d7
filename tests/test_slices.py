"""File names -> SliceRef: glob, integer indices, scans, and names that must be refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nrrn_daemon.config.loading import BUNDLED_PROFILES, load_profile
from nrrn_daemon.slices import NameRejected, RejectReason, SliceParser, SliceRef, parse_slice

ROOT = Path("/data/acq")
HELIOS_GLOB = "SEM Image - SliceImage - *.tif"
HELIOS_REGEX = r"SliceImage - (?P<index>\d+)\.tif$"
REPEAT_REGEX = r"slice(?P<index>\d+)_scan(?P<scan>\d+)\.tif$"


@pytest.fixture
def helios() -> SliceParser:
    return SliceParser(HELIOS_GLOB, HELIOS_REGEX, root=ROOT)


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("SEM Image - SliceImage - 001.tif", 1),
        ("SEM Image - SliceImage - 9.tif", 9),
        ("SEM Image - SliceImage - 010.tif", 10),
        ("SEM Image - SliceImage - 123456.tif", 123456),
    ],
)
def test_helios_names(helios: SliceParser, name: str, index: int) -> None:
    ref = helios.parse(ROOT / name)
    assert ref == SliceRef(path=ROOT / name, name=name, index=index, scan=None)


def test_indices_sort_as_integers(helios: SliceParser) -> None:
    names = ["SEM Image - SliceImage - 010.tif", "SEM Image - SliceImage - 9.tif"]
    refs = [helios.parse(ROOT / n) for n in names]
    assert all(isinstance(r, SliceRef) for r in refs)
    assert sorted(r.index for r in refs if isinstance(r, SliceRef)) == [9, 10]


@pytest.mark.parametrize(
    "name",
    [
        "SEM Image 2 - SliceImage - 001.tif",  # second detector: another glob
        "SEM Image - SliceImage - 001.tif.part",
        "SEM Image - SliceImage - 001.TIF",  # the glob is case-sensitive
        "notes.txt",
        "",
    ],
)
def test_names_outside_the_glob_are_not_ours(helios: SliceParser, name: str) -> None:
    assert helios.parse(ROOT / name) is None


def test_glob_match_without_index_is_rejected_not_raised(helios: SliceParser) -> None:
    result = helios.parse(ROOT / "SEM Image - SliceImage - final.tif")
    assert isinstance(result, NameRejected)
    assert result.reason is RejectReason.NO_INDEX
    assert "finds no index" in str(result) and "final" in result.message


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        (ROOT / ".." / "SEM Image - SliceImage - 001.tif", RejectReason.UNSAFE_PATH),
        ("../SEM Image - SliceImage - 001.tif", RejectReason.UNSAFE_PATH),
        ("/elsewhere/SEM Image - SliceImage - 001.tif", RejectReason.UNSAFE_PATH),
        (ROOT / "sub" / "SEM Image - SliceImage - 001.tif", RejectReason.SUBFOLDER),
        (ROOT / "SEM Image - SliceImage - ..\\001.tif", RejectReason.UNSAFE_PATH),
    ],
)
def test_paths_that_escape_are_rejected(
    helios: SliceParser, path: str | Path, reason: RejectReason
) -> None:
    result = helios.parse(path)
    assert isinstance(result, NameRejected) and result.reason is reason


def test_relative_paths_are_taken_under_the_root(helios: SliceParser) -> None:
    ref = helios.parse("SEM Image - SliceImage - 004.tif")
    assert isinstance(ref, SliceRef) and ref.path == ROOT / "SEM Image - SliceImage - 004.tif"


def test_recursive_accepts_subfolders() -> None:
    parser = SliceParser(HELIOS_GLOB, HELIOS_REGEX, root=ROOT, recursive=True)
    ref = parser.parse(ROOT / "run2" / "SEM Image - SliceImage - 003.tif")
    assert isinstance(ref, SliceRef) and ref.index == 3


def test_without_root_only_dotdot_is_refused() -> None:
    parser = SliceParser("*.tif", r"(?P<index>\d+)")
    assert isinstance(parser.parse("/anywhere/s5.tif"), SliceRef)
    assert isinstance(parser.parse("a/../s5.tif"), NameRejected)


@pytest.mark.parametrize(
    ("name", "index", "scan"),
    [("slice0007_scan1.tif", 7, 1), ("slice10_scan02.tif", 10, 2)],
)
def test_repeat_scans(name: str, index: int, scan: int) -> None:
    parser = SliceParser("slice*.tif", REPEAT_REGEX, mode="repeat-scans", root=ROOT)
    assert parser.parse(ROOT / name) == SliceRef(ROOT / name, name, index, scan)


def test_repeat_scans_without_scan_is_rejected() -> None:
    regex = r"slice(?P<index>\d+)(?:_scan(?P<scan>\d+))?\.tif$"
    parser = SliceParser("slice*.tif", regex, mode="repeat-scans", root=ROOT)
    result = parser.parse(ROOT / "slice0007.tif")
    assert isinstance(result, NameRejected) and result.reason is RejectReason.NO_SCAN
    adjacent = SliceParser("slice*.tif", regex, root=ROOT)
    assert adjacent.parse(ROOT / "slice0007.tif") == SliceRef(
        ROOT / "slice0007.tif", "slice0007.tif", 7, None
    )


def test_non_integer_index_is_rejected() -> None:
    parser = SliceParser("*.tif", r"^(?P<index>\w+)\.tif$", root=ROOT)
    result = parser.parse(ROOT / "abc.tif")
    assert isinstance(result, NameRejected) and result.reason is RejectReason.BAD_INDEX


def test_constructor_checks_groups() -> None:
    with pytest.raises(ValueError, match="index"):
        SliceParser("*.tif", r"(\d+)")
    with pytest.raises(ValueError, match="scan"):
        SliceParser("*.tif", r"(?P<index>\d+)", mode="repeat-scans")


@pytest.mark.parametrize("name", ["helios", "atlas", "generic", "demo"])
def test_from_profile_and_parse_slice(name: str) -> None:
    profile = load_profile(name, search_path=[BUNDLED_PROFILES])
    parser = SliceParser.from_profile(profile)
    example = {
        "helios": "SEM Image - SliceImage - 042.tif",
        "atlas": "slice_00042.tif",
        "generic": "run3_slice0042.tif",
        "demo": "SEM Image - SliceImage - 042.tif",
    }[name]
    path = profile.watch.folder / example
    ref = parser.parse(path)
    assert isinstance(ref, SliceRef) and ref.index == 42
    assert parse_slice(path, profile.watch.folder, profile.watch) == ref


@given(index=st.integers(min_value=0, max_value=10**9), width=st.integers(1, 12))
def test_any_zero_padding_gives_the_integer(index: int, width: int) -> None:
    parser = SliceParser(HELIOS_GLOB, HELIOS_REGEX, root=ROOT)
    name = f"SEM Image - SliceImage - {index:0{width}d}.tif"
    ref = parser.parse(ROOT / name)
    assert isinstance(ref, SliceRef) and ref.index == index and ref.name == name


NAME_CHARS = st.characters(
    blacklist_categories=("Cs",), blacklist_characters="\0", min_codepoint=32
)


@given(name=st.text(NAME_CHARS, min_size=1, max_size=40))
def test_any_name_gives_one_of_three_answers(name: str) -> None:
    parser = SliceParser("*.tif", r"(?P<index>\d+)\D*$", root=ROOT)
    result = parser.parse(ROOT / name)
    assert result is None or isinstance(result, (SliceRef, NameRejected))
    if isinstance(result, SliceRef):
        assert result.path.parent == ROOT and "/" not in result.name
        assert "\\" not in result.name and result.name.endswith(".tif")
        assert result.index >= 0
