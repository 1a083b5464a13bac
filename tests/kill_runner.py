"""Run `ntrk ...` and SIGKILL this process at a chosen point (tests/test_faults.py).

    python tests/kill_runner.py POINT ntrk-args...

POINT: ``png:N`` (after the N-th PNG is renamed into place, before its record), ``half:N``
(halfway through writing the N-th PNG's temporary file), ``records`` (after records.jsonl is
written, before metrics.json), ``states`` (after the metric states of the run are saved, before
the key list that makes them count), ``identity`` (after the lock is taken and run.json written,
before anything is generated). Exits 3 if the point was never reached.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package first


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    from ntrk_lightning import fileio
    from ntrk_lightning.pipeline import layout, run

    kind, _, arg = point.partition(":")
    count = [0]
    if kind in ("png", "half"):
        orig = layout.atomic_write_bytes
        n = int(arg)

        def write_png(path, data):
            count[0] += 1
            if count[0] == n and kind == "half":
                def half(tmp):
                    with open(tmp, "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                    _die()
                fileio.atomic_write(path, half)
            result = orig(path, data)
            if count[0] == n:
                _die()
            return result

        layout.atomic_write_bytes = write_png
    elif kind == "records":
        from ntrk_lightning.pipeline import writer

        orig_records = writer.update_records_jsonl

        def records_then_die(*args, **kw):  # written (appended or rewritten), with its index
            orig_records(*args, **kw)
            _die()

        writer.update_records_jsonl = records_then_die
    elif kind == "states":
        from ntrk_lightning.pipeline import writer

        orig_text = writer.atomic_write_text

        def key_list_or_die(path, text, **kw):
            if Path(path).parent.name == layout.STATES:
                _die()
            return orig_text(path, text, **kw)

        writer.atomic_write_text = key_list_or_die
    elif kind == "identity":
        orig_identity = run.check_identity

        def identity_then_die(out, fp):
            orig_identity(out, fp)
            _die()

        run.check_identity = identity_then_die
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from ntrk_lightning.cli import main

    main(sys.argv[2:])
    sys.exit(3)
