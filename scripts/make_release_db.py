"""Write a small provenance database with the nrrn-daemon code found first on PYTHONPATH.

Used once to make ``tests/store/data/release-dc0de7c.sqlite``, the database of the release before
the ``output_quality`` table, so a test can check that databases of that release keep working::

    mkdir /tmp/release && git archive dc0de7c nrrn_daemon | tar -x -C /tmp/release
    PYTHONPATH=/tmp/release python scripts/make_release_db.py \
        tests/store/data/release-dc0de7c.sqlite
"""

from __future__ import annotations

import sys
from pathlib import Path

import nrrn_daemon
from nrrn_daemon.store.store import Store


def main(path: Path) -> None:
    print("writing with", nrrn_daemon.__file__)
    path.unlink(missing_ok=True)
    clock = iter(float(1_700_000_000 + k) for k in range(1000))
    with Store(path, clock=lambda: next(clock)) as store:
        ds = store.ensure_dataset("old", "/data/old/raw", "generic")
        model = store.ensure_model(
            label="base", path="/models/base.pt", sha256="a" * 64, kind="base",
            config={"blocks": 1},
        )  # fmt: skip
        ids = [
            store.upsert_slice(
                ds,
                path=f"/data/old/raw/s_{i:03d}.tif",
                name=f"s_{i:03d}.tif",
                index=i,
                scan=None,
                size=100,
                mtime=1.0,
                sha256=f"{i:064d}",
                state="ready",
                ready_at=1.0,
            )  # fmt: skip
            for i in range(3)
        ]
        store.record_output(
            dataset_id=ds, centre_slice_id=ids[1],
            inputs=[(ids[0], "prev", "0" * 64), (ids[1], "centre", f"{1:064d}"),
                    (ids[2], "next", f"{2:064d}")],
            path="/data/old/out/s_001.tif", sha256="b" * 64, mode="triplet", model_id=model,
            settings={"tile": 64}, device="cpu", ready_at=1.0, started_at=2.0, finished_at=3.0,
            read_s=0.1, model_s=0.5, write_s=0.1, reason="first",
        )  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
