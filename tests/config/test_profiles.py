"""Profiles: shipped files load, and every kind of mistake gives one clear ProfileError."""

from __future__ import annotations

import re
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from nrrn_daemon.config.loading import (
    BUNDLED_PROFILES,
    list_profiles,
    load_profile,
    profile_field_docs,
    profile_search_path,
)
from nrrn_daemon.config.profiles import Profile
from nrrn_daemon.errors import InputError, ProfileError

SHIPPED = ["atlas", "demo", "generic", "helios"]


def write_profile(folder: Path, text: str, name: str = "lab") -> Path:
    """Write ``folder/<name>.toml``: the name, then ``text`` (tables); the rest is defaults."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(f'name = "{name}"\n{text}', encoding="utf-8")
    return path


def folders(tmp_path: Path) -> dict[str, str]:
    """Overrides that put the watch folder, outputs and database under ``tmp_path``."""
    return {
        "watch.folder": str(tmp_path / "in"),
        "output.folder": str(tmp_path / "out"),
        "store.database": str(tmp_path / "db.sqlite"),
    }


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads(name: str) -> None:
    profile = load_profile(name, search_path=[BUNDLED_PROFILES])
    assert profile.name == name
    assert profile.source == BUNDLED_PROFILES / f"{name}.toml"
    assert profile.description
    assert re.compile(profile.watch.index_regex).groupindex["index"]


@pytest.mark.parametrize(
    ("name", "file_name", "index"),
    [
        ("helios", "SEM Image - SliceImage - 001.tif", 1),
        ("helios", "SEM Image - SliceImage - 1234.tif", 1234),
        ("atlas", "slice_00042.tif", 42),
        ("generic", "run3_slice0042.tif", 42),
        ("demo", "SEM Image - SliceImage - 010.tif", 10),
    ],
)
def test_shipped_regexes_find_the_index(name: str, file_name: str, index: int) -> None:
    watch = load_profile(name, search_path=[BUNDLED_PROFILES]).watch
    assert int(re.search(watch.index_regex, file_name)["index"]) == index


def test_demo_profile_is_fast_and_small() -> None:
    demo = load_profile("demo", search_path=[BUNDLED_PROFILES])
    assert demo.watch.settle_s <= 0.5 and demo.grouping.neighbour_wait_s <= 5
    assert demo.model.checkpoint == "base" and not demo.finetune.enabled


def test_helios_reads_fei_databar_and_polls() -> None:
    helios = load_profile("helios", search_path=[BUNDLED_PROFILES])
    assert helios.image.databar == "fei" and helios.watch.observer == "listing"


def test_helios_handles_both_auto_slice_and_view_detectors() -> None:
    helios = load_profile("helios", search_path=[BUNDLED_PROFILES])
    globs = helios.watch.channel_globs
    names = {
        "SEM Image - SliceImage - 001.tif": "SEM Image",
        "SEM_Image-SliceImage-001.tif": "SEM Image",
        "SEM Image 2 - SliceImage - 001.tif": "SEM Image 2",
    }
    for file_name, channel in names.items():
        assert [c for c, glob in globs.items() if fnmatchcase(file_name, glob)] == [channel]


def test_detectors_are_channels_of_their_auto_slice_and_view_names(tmp_path: Path) -> None:
    path = write_profile(tmp_path, '[watch]\ndetectors = ["SEM Image", "SEM Image 2", "ETD"]\n')
    profile = load_profile(path, folders(tmp_path))
    globs = profile.watch.channel_globs
    assert list(globs) == ["SEM Image", "SEM Image 2", "ETD"] and profile.watch.channels == {}
    names = {
        "SEM Image - SliceImage - 001.tif": "SEM Image",
        "SEM_Image-SliceImage-001.tif": "SEM Image",
        "SEM Image 2 - SliceImage - 014.tif": "SEM Image 2",
        "SEM_Image_2-SliceImage-014.tif": "SEM Image 2",
        "ETD - SliceImage - 3.tif": "ETD",
        "notes.txt": None,
        "SEM Image 3 - SliceImage - 001.tif": None,
    }
    for file_name, channel in names.items():
        matched = [c for c, glob in globs.items() if fnmatchcase(file_name, glob)]
        assert matched == ([channel] if channel else []), file_name
    one = profile.for_channel("SEM Image 2")
    assert one.watch.glob == globs["SEM Image 2"] and not one.watch.channel_globs


@pytest.mark.parametrize(
    ("fragment", "expected"),
    [
        (
            '[watch]\ndetectors = ["SEM Image"]\nchannels = { "SEM Image" = "SEM*.tif" }',
            "watch.detectors and watch.channels both name the channels; give one of them",
        ),
        ('[watch]\ndetector = ["SEM Image"]', "unknown field 'watch.detector'"),
        ('[watch]\ndetectors = ["SEM Image", "SEM Image"]', "a detector is named twice"),
        ('[watch]\ndetectors = ["SEM/Image"]', "detector name 'SEM/Image' must be letters"),
        (
            '[watch]\ndetectors = ["SEM Image", "SEM Image Second"]',
            "detectors 'SEM Image' and 'SEM Image Second' cannot be told apart by file name",
        ),
        (
            '[watch]\ndetectors = ["A", "B"]\n[output]\nnaming = "{index}.tif"',
            "use {name} or {stem} with several watch.channels or detectors",
        ),
    ],
)
def test_bad_detectors_are_refused_with_the_reason(
    tmp_path: Path, fragment: str, expected: str
) -> None:
    path = write_profile(tmp_path, fragment + "\n")
    with pytest.raises(ProfileError) as err:
        load_profile(path, folders(tmp_path))
    assert expected in str(err.value) and str(path) in str(err.value)


def test_defaults_fill_missing_tables(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path, ""))
    assert profile.grouping.mode == "adjacent" and profile.model.tile == 512
    assert profile.watch.folder == Path("/data/fibsem/incoming")
    assert load_profile(write_profile(tmp_path, ""), folders(tmp_path)).watch.folder == (
        tmp_path / "in"
    )


def test_unknown_field_is_named_with_the_allowed_ones(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "\n[grouping]\nneighbor_wait_s = 3\n")
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    message = str(err.value)
    assert "grouping.neighbor_wait_s" in message and "neighbour_wait_s" in message
    assert str(path) in message


def test_unknown_top_level_table(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"unknown field 'outputs'.*allowed in the top level"):
        load_profile(write_profile(tmp_path, '\n[outputs]\nfolder = "/x"\n'))


@pytest.mark.parametrize(
    ("fragment", "field", "given"),
    [
        ("[model]\ntile = 32", "model.tile", "32"),
        ("[model]\ntile_batch = 0", "model.tile_batch", "0"),
        ("[watch]\npoll_interval_s = 0.01", "watch.poll_interval_s", "0.01"),
        ("[grouping]\nscans_per_slice = 17", "grouping.scans_per_slice", "17"),
        ("[finetune]\nvalidation_fraction = 0.9", "finetune.validation_fraction", "0.9"),
        ('[watch]\nobserver = "inotify"', "watch.observer", "inotify"),
        ('[model]\ndevice = "tpu"', "model.device", "tpu"),
        ('[model]\ncheckpoint = "mine.ckpt"', "model.checkpoint", "mine.ckpt"),
        ('[finetune]\ncron = "0 2 * *"', "finetune.cron", "0 2 * *"),
        ('[finetune]\ncron = "0 25 * * *"', "finetune.cron", "0 25 * * *"),
        ("[watch]\nglob = 'sub/*.tif'", "watch.glob", "sub/*.tif"),
    ],
)
def test_bad_values_name_field_and_value(
    tmp_path: Path, fragment: str, field: str, given: str
) -> None:
    with pytest.raises(ProfileError) as err:
        load_profile(write_profile(tmp_path, "\n" + fragment + "\n"))
    assert field in str(err.value) and given in str(err.value)


def test_bad_name(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "")
    path.write_text(path.read_text().replace('name = "lab"', 'name = "Lab One"'))
    with pytest.raises(ProfileError, match="name.*Lab One"):
        load_profile(path)


def test_missing_name(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('description = "no name"\n')
    with pytest.raises(ProfileError, match="name: required field is missing"):
        load_profile(path)


def test_bad_regex(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"watch\.index_regex: not a valid regular expression"):
        load_profile(write_profile(tmp_path, "\n[watch]\nindex_regex = '(?P<index>\\d+'\n"))


def test_regex_without_index_group(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"watch\.index_regex: .*no named group `index`"):
        load_profile(write_profile(tmp_path, "\n[watch]\nindex_regex = '(\\d+)'\n"))


def test_repeat_scans_needs_scan_group(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="needs a named group `scan`"):
        load_profile(write_profile(tmp_path, '\n[grouping]\nmode = "repeat-scans"\n'))
    fragment = (
        '\n[grouping]\nmode = "repeat-scans"\n'
        "[watch]\nindex_regex = '(?P<index>\\d+)_scan(?P<scan>\\d+)'\n"
    )
    assert load_profile(write_profile(tmp_path, fragment)).grouping.mode == "repeat-scans"


@pytest.mark.parametrize("output", ["{watch}", "{watch}/denoised", "{watch}/a/../b"])
def test_output_inside_watch_folder_is_rejected(tmp_path: Path, output: str) -> None:
    path = write_profile(tmp_path, "")
    overrides = folders(tmp_path) | {"output.folder": output.format(watch=tmp_path / "in")}
    with pytest.raises(ProfileError, match="output.folder .* is the watch folder or inside it"):
        load_profile(path, overrides)


def test_relative_output_inside_relative_watch_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    overrides = {"watch.folder": "acq", "output.folder": "acq/../acq/out"}
    with pytest.raises(ProfileError, match="inside it"):
        load_profile(write_profile(tmp_path, ""), overrides)


def test_database_inside_watch_folder_is_rejected(tmp_path: Path) -> None:
    overrides = folders(tmp_path) | {"store.database": str(tmp_path / "in" / "db.sqlite")}
    with pytest.raises(ProfileError, match="store.database"):
        load_profile(write_profile(tmp_path, ""), overrides)


@pytest.mark.parametrize(
    "naming",
    ["../{name}", "sub/{name}", "{stem}\\\\x.tif", "denoised.tif", "{nam}", "{0}", "{name"],
)
def test_unsafe_or_broken_naming_template_is_rejected(tmp_path: Path, naming: str) -> None:
    with pytest.raises(ProfileError, match="output.naming"):
        load_profile(write_profile(tmp_path, f'\n[output]\nnaming = "{naming}"\n'))


@pytest.mark.parametrize(
    ("naming", "expected"),
    [
        ("{name}", "SEM Image - SliceImage - 007.tif"),
        ("{stem}_nrrn{suffix}", "SEM Image - SliceImage - 007_nrrn.tif"),
        ("slice_{index:05d}.tif", "slice_00007.tif"),
    ],
)
def test_output_name(tmp_path: Path, naming: str, expected: str) -> None:
    profile = load_profile(write_profile(tmp_path, ""), {"output.naming": naming})
    assert profile.output_name("SEM Image - SliceImage - 007.tif", 7) == expected


def test_output_name_rejects_what_is_not_a_file_name(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path, ""), {"output.naming": "d_{index}.tif"})
    with pytest.raises(InputError, match="no index"):
        profile.output_name("x.tif", None)
    with pytest.raises(InputError, match="not a plain file name"):
        Profile(name="p").output_name("..", 1)


def test_overrides_apply_before_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACQ_ROOT", str(tmp_path / "acq"))
    profile = load_profile(
        write_profile(tmp_path, ""),
        {"watch.folder": "$ACQ_ROOT/in", "model.tile": 256, "grouping.neighbour_wait_s": 1},
    )
    assert profile.watch.folder == tmp_path / "acq" / "in"
    assert profile.model.tile == 256 and profile.grouping.neighbour_wait_s == 1
    with pytest.raises(ProfileError, match="model.tile"):
        load_profile(write_profile(tmp_path, ""), {"model.tile": 1})
    with pytest.raises(ProfileError, match="unknown field 'watch.foldr'"):
        load_profile(write_profile(tmp_path, ""), {"watch.foldr": "/x"})


def test_home_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    profile = load_profile(
        write_profile(tmp_path, ""),
        {"store.database": "~/nrrn.sqlite", "output.folder": "out", "model.checkpoint": "~/m.pt"},
    )
    assert profile.store.database == tmp_path / "nrrn.sqlite"
    assert profile.output.folder == Path("out")  # relative stays relative
    assert profile.model.checkpoint_path == tmp_path / "m.pt"


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken"\n[watch]\nfolder = /no/quotes\n')
    with pytest.raises(ProfileError, match=r"broken\.toml: not valid TOML.*line 3"):
        load_profile(path)


def test_lookup_by_name_first_folder_wins(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    write_profile(first, '\ndescription = "first"\n')
    write_profile(second, '\ndescription = "second"\n')
    assert load_profile("lab", search_path=[first, second]).description == "first"


def test_env_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_profile(tmp_path / "mine", "")
    monkeypatch.setenv("NRRN_PROFILES", f"{tmp_path / 'nowhere'}:{tmp_path / 'mine'}")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert profile_search_path()[:3] == [
        tmp_path / "nowhere",
        tmp_path / "mine",
        tmp_path / "config" / "nrrn-daemon" / "profiles",
    ]
    assert profile_search_path()[-2:] == [
        BUNDLED_PROFILES,
        Path(sys.prefix) / "share" / "nrrn-daemon" / "profiles",
    ]
    assert load_profile("lab").source == tmp_path / "mine" / "lab.toml"
    assert load_profile("helios").name == "helios"  # bundled ones still found


def test_unknown_name_lists_available_and_search_path(tmp_path: Path) -> None:
    write_profile(tmp_path, "")
    with pytest.raises(ProfileError) as err:
        load_profile("helio", search_path=[tmp_path, BUNDLED_PROFILES])
    message = str(err.value)
    assert "unknown profile 'helio'" in message
    assert "helios" in message and "lab" in message and str(tmp_path) in message


@pytest.mark.parametrize("name", ["..", "Helios", "a b"])
def test_names_cannot_escape(tmp_path: Path, name: str) -> None:
    with pytest.raises(ProfileError, match="invalid profile name"):
        load_profile(name, search_path=[tmp_path])


def test_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "nope.toml")


def test_list_profiles(tmp_path: Path) -> None:
    write_profile(tmp_path, "")
    (tmp_path / "broken.toml").write_text("name = 'broken'\n[model]\ntile = 1\n")
    (tmp_path / "helios.toml").write_text((BUNDLED_PROFILES / "helios.toml").read_text())
    entries = {e.name: e for e in list_profiles([tmp_path, BUNDLED_PROFILES])}
    assert set(SHIPPED) | {"lab", "broken"} <= set(entries)
    assert entries["lab"].profile is not None and entries["lab"].error is None
    assert entries["broken"].profile is None and "model.tile" in (entries["broken"].error or "")
    assert entries["helios"].path == tmp_path / "helios.toml"  # first occurrence wins
    assert list(entries) == sorted(entries)


def test_field_docs_cover_every_field() -> None:
    docs = dict(profile_field_docs())
    assert {
        "name", "watch.folder", "watch.index_regex", "watch.channels", "output.naming",
        "finetune.cron",
    } <= set(docs)  # fmt: skip
    assert all(text for text in docs.values()), [k for k, v in docs.items() if not v]
    # 38 + [frames] (10) + [dashboard] (5) + watch.answer_timeout_s, .follow_links, .channels,
    # .detectors
    assert len(docs) == 57


def test_profiles_are_frozen(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path, ""))
    with pytest.raises(Exception, match="frozen"):
        profile.model.tile = 128  # type: ignore[misc]
