"""What keeps a run folder whole: its identity (``run.json``), its lock (``run.lock``) and the
checks of finished samples on resume (see docs/run_format.md).

* **Identity.** ``run.json`` holds a fingerprint of everything that decides the samples: the
  backbone (class, init arguments, size and sha256 of its weight files), the guidance reward and
  the evaluation rewards (the same), the run seed, the prompt list and, per arm, the sampler
  spec and its steps. A rerun compares its own fingerprint with the stored one before any model
  work and is refused, naming what differs, unless it only *extends* the run (more prompts after
  the stored ones, more samples per prompt, another arm). A folder written before fingerprints
  existed is adopted: the rerun's fingerprint is written, and the checks below then regenerate
  any sample whose record does not match it.
* **Lock.** One run at a time writes a folder: ``run.lock`` is created with ``O_CREAT|O_EXCL`` and
  holds the holder's host, PID (and the PID's start time), Slurm job and start time. A lock whose
  holder is gone (same host, PID not running) or is an earlier attempt of the same Slurm job (a
  requeue) is taken over; a lock held from another host is never guessed stale: the refusal
  says which host holds it and how to remove it. Global rank 0 takes the lock in the data
  module's ``setup`` (before any rank loads a model) and the other ranks learn the outcome by
  broadcast.
* **Integrity.** A finished sample is a record JSON and its PNG; the record carries the PNG's
  byte size and sha256. On resume every finished sample of the request is checked: quickly, when
  both files still have the size and mtime its record-shard line says (the stat signature, see
  :mod:`.layout`), else in full (record parses and names its own key and prompt, PNG size and
  checksum match); anything that fails is deleted, counted and generated again.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Container, NamedTuple, Optional, Sequence

from ntrk_lightning.fileio import atomic_write_json, file_identity, json_safe, sha256_file
from ntrk_lightning.pipeline import layout

RUN_JSON = layout.RUN_JSON
LOCK = layout.LOCK
FORMAT_VERSION = 1
#: a lock file still empty after this many seconds belongs to a writer that died mid-creation
EMPTY_LOCK_STALE_SECONDS = 30


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (locked, another run's, every sample failed); the
    message is one line naming the folder and what to do."""


# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------

def _plain(v: Any) -> Any:
    """JSON-able, order-stable form of a config value or hyperparameter."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float):
        return v if v == v and v not in (float("inf"), float("-inf")) else repr(v)
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if hasattr(v, "as_dict"):  # jsonargparse Namespace
        return _plain(v.as_dict())
    return repr(v)


def _strip_paths(v: Any) -> Any:
    """Init arguments with local paths replaced by a marker: the weights' content (hashed
    separately) is what decides the samples, not where the files happen to live."""
    if isinstance(v, dict):
        return {k: _strip_paths(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_strip_paths(x) for x in v]
    if isinstance(v, str) and (os.sep in v or v.startswith(".")) and Path(v).exists():
        return "<local path>"
    return v


def _weight_files(obj: Any, spec: Any) -> list[Path]:
    """Files whose content decides ``obj``'s outputs: its ``weight_files()`` if it has one, else
    every existing file named by its init arguments (files inside named folders included)."""
    fn = getattr(obj, "weight_files", None)
    if callable(fn):
        return [Path(p) for p in fn()]
    found: list[Path] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v:
            p = Path(v)
            try:
                if p.is_file():
                    found.append(p)
                elif p.is_dir():
                    found.extend(q for q in sorted(p.rglob("*")) if q.is_file()
                                 and q.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".txt"))
            except OSError:
                pass

    walk(spec)
    return found


def component_fingerprint(obj: Any, spec: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Class, init arguments (from the parsed config when known) and weight-file identities."""
    if spec is None:
        describe = getattr(obj, "describe", None)
        spec = {"class_path": f"{type(obj).__module__}.{type(obj).__qualname__}",
                "describe": _plain(describe()) if callable(describe) else None}
    spec = _plain(spec)
    weights = sorted((file_identity(p) for p in _weight_files(obj, spec)), key=lambda d: (d["name"], d["sha256"]))
    return {**_strip_paths(spec), "weights": weights}


def model_fingerprint(module: Any, specs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The model's part of a generation run's fingerprint (``module``: a ``GenerationModule``;
    ``specs``: class paths and init arguments of its backbone and rewards as configured)."""
    specs = specs or {}
    eval_specs = specs.get("eval_rewards") or {}
    return {
        "format": FORMAT_VERSION,
        "backbone": component_fingerprint(module.backbone, specs.get("backbone")),
        "reward": component_fingerprint(module.reward, specs.get("reward")),
        "eval_rewards": {n: component_fingerprint(r, eval_specs.get(n)) for n, r in module.eval_rewards.items()},
        "arms": {arm: {"class_path": f"{type(s).__module__}.{type(s).__qualname__}",
                       "sampler": _plain(s.describe()), "num_steps": int(module.num_steps[arm])}
                 for arm, s in module.samplers.items()},
    }


def fingerprint(module: Any, prompts: Sequence[str], seed: int, specs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The fingerprint of a generation run: the model's part plus the run seed and prompts."""
    return {**model_fingerprint(module, specs), "seed": int(seed), "prompts": list(prompts)}


def _first_difference(a: Any, b: Any, path: str) -> Optional[str]:
    if a in (None, "<local path>") and b in (None, "<local path>"):
        return None  # a default folder or an explicit one: the weight hashes decide
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}"
            d = _first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else path


def _short(v: Any, limit: int = 60) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _get(d: Any, dotted: str) -> Any:
    cur = d
    for part in dotted.strip(".").replace("]", "").replace("[", ".").split("."):
        if isinstance(cur, dict):
            cur = cur.get(part, "<absent>")
        elif isinstance(cur, list):
            try:
                cur = cur[int(part)]
            except (ValueError, IndexError):
                return "<absent>"
        else:
            return "<absent>"
    return cur


def merge_fingerprint(stored: dict[str, Any], new: dict[str, Any]) -> tuple[Optional[str], dict[str, Any]]:
    """(what differs, or ``None``; the fingerprint to store). Extending is allowed: prompts
    appended after the stored ones, arms added (stored arms the rerun does not name are kept)."""
    for field in ("backbone", "reward", "eval_rewards", "seed"):
        d = _first_difference(stored.get(field), new.get(field), field)
        if d:
            return (f"{d} was {_short(_get(stored, d))}, now {_short(_get(new, d))}", stored)
    old_p, new_p = list(stored.get("prompts") or []), list(new.get("prompts") or [])
    common = min(len(old_p), len(new_p))
    for i in range(common):
        if old_p[i] != new_p[i]:
            return (f"prompt {i} was {_short(old_p[i])}, now {_short(new_p[i])} (only appending prompts "
                    "extends a run)", stored)
    arms = dict(stored.get("arms") or {})
    for arm, spec in (new.get("arms") or {}).items():
        if arm in arms:
            d = _first_difference(arms[arm], spec, f"arms.{arm}")
            if d:
                return (f"{d} was {_short(_get(stored, d))}, now {_short(_get(new, d))}", stored)
        else:
            arms[arm] = spec
    merged = dict(new)
    merged["prompts"] = old_p if len(old_p) >= len(new_p) else new_p
    merged["arms"] = arms
    return None, merged


def check_identity(out: Path, new: dict[str, Any]) -> str:
    """Compare with ``out/run.json`` and store the merged fingerprint; returns ``"new"``,
    ``"same"``, ``"extended"`` or ``"adopted"`` (a folder with samples but no fingerprint).
    Raises :class:`RunFolderError` naming the first difference."""
    path = out / RUN_JSON
    stored: Optional[dict[str, Any]] = None
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(stored, dict) or "fingerprint" not in stored:
                raise ValueError("no 'fingerprint' object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise RunFolderError(f"{path} is unreadable ({e}); restore it, or delete it to adopt the folder "
                                 "(finished samples are then checked against this run's settings)") from None
    if stored is None:
        _write_run_json(out, new)
        return "adopted" if _has_samples(out) else "new"
    diff, merged = merge_fingerprint(stored["fingerprint"], new)
    if diff and not _has_samples(out):
        # nothing generated under the stored identity (e.g. a first attempt that stopped at a
        # corrupt weights file): nothing can be mixed, so the folder takes the new identity
        _write_run_json(out, new)
        return "new"
    if diff:
        raise RunFolderError(f"{out} holds a different run: {diff}; use another --output_dir (a run "
                             "folder can only be extended: more prompts, samples or arms)")
    if merged != stored["fingerprint"]:
        _write_run_json(out, merged, created=stored.get("created"))
        return "extended"
    return "same"


def _has_samples(out: Path) -> bool:
    """Whether ``out`` holds any sample record or failure marker."""
    images = out / layout.IMAGES
    return images.is_dir() and any(p.name.endswith(".json") for p in images.rglob("p*_s*.json"))


def _write_run_json(out: Path, fp: dict[str, Any], created: Optional[str] = None) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(out / RUN_JSON, {"created": created or now, "updated": now, "fingerprint": fp})


# ---------------------------------------------------------------------------------------------
# Lock
# ---------------------------------------------------------------------------------------------

_HELD: dict[str, "RunLock"] = {}


def _proc_start(pid: int) -> Optional[str]:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    now = _proc_start(pid)
    return not (start and now and now != start)


class RunLock:
    """The lock file of one run folder, held by this process (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.token = uuid.uuid4().hex
        self.held = False

    def _payload(self) -> dict[str, Any]:
        import sys

        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
                "slurm_job": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self.token,
                "command": " ".join(sys.argv)[:500]}

    def _read(self) -> Optional[dict[str, Any]]:
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
            return d if isinstance(d, dict) else None
        except (OSError, UnicodeDecodeError, ValueError):
            return None

    def _stale(self, holder: Optional[dict[str, Any]]) -> bool:
        if holder is None:  # being written, or its writer died between create and write
            try:
                return time.time() - self.path.stat().st_mtime > EMPTY_LOCK_STALE_SECONDS
            except OSError:
                return True
        if holder.get("token") in {lk.token for lk in _HELD.values()}:
            return False
        me = self._payload()
        if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
            # a requeued Slurm job (any node) replaces its own earlier attempt
            if int(holder.get("slurm_restart") or 0) < me["slurm_restart"]:
                return True
            if holder.get("host") != me["host"]:
                return False
        if holder.get("host") != me["host"]:
            return False  # cannot see the holder's processes: never guess
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():
            return True  # this process, but no lock object of it holds it: left by a failed run
        return not _alive(pid, holder.get("pid_start"))

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if not self._stale(holder):
                    raise RunFolderError(self._refusal(holder)) from None
                self._take_over(holder)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._payload(), f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            _HELD[self.token] = self
            return
        raise RunFolderError(f"could not take the lock {self.path}: other processes keep replacing it")

    def _take_over(self, holder: Optional[dict[str, Any]]) -> None:
        """Move the stale lock aside; if what was moved is not the stale lock (someone else took
        over in between), put it back."""
        aside = self.path.with_name(f".{LOCK}.{self.token}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = None
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        if holder is not None and (not isinstance(moved, dict) or moved.get("token") != holder.get("token")):
            try:
                os.link(aside, self.path)  # fails if yet another lock exists: then that one stands
            except OSError:
                pass
        try:
            os.unlink(aside)
        except OSError:
            pass

    def _refusal(self, holder: Optional[dict[str, Any]]) -> str:
        if holder is None:
            return (f"{self.folder} is locked by a run that is starting ({self.path} is being written); "
                    "wait for it, or use another --output_dir")
        where = f"PID {holder.get('pid')} on host {holder.get('host')}"
        if holder.get("slurm_job"):
            where += f" (Slurm job {holder.get('slurm_job')})"
        return (f"{self.folder} is in use by another run: {where}, started {holder.get('started')}; wait for "
                f"it or use another --output_dir (if that process is gone, delete {self.path})")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD.pop(self.token, None)
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            try:
                self.path.unlink()
            except OSError:
                pass


def release_all() -> None:
    """Release every lock this process holds (end of a run, errors, exit)."""
    for lk in list(_HELD.values()):
        lk.release()


import atexit  # noqa: E402

atexit.register(release_all)


# ---------------------------------------------------------------------------------------------
# Integrity of finished samples
# ---------------------------------------------------------------------------------------------

def _check_png(path: Path, rec: dict[str, Any]) -> Optional[str]:
    try:
        size = path.stat().st_size
    except OSError:
        return "PNG missing"
    if "png_sha256" in rec:
        if size != rec.get("png_bytes"):
            return f"PNG has {size} bytes, its record says {rec.get('png_bytes')}"
        if sha256_file(path) != rec["png_sha256"]:
            return "PNG checksum differs from its record"
        return None
    from PIL import Image  # a record from before checksums: the PNG must at least decode

    try:
        with Image.open(path) as img:
            img.load()
    except Exception as e:
        return f"PNG does not decode ({type(e).__name__})"
    return None


def _check_record(rec_path: Path, key: layout.Key, prompts: Sequence[str]) -> tuple[dict[str, Any], Optional[str]]:
    """(record, problem or ``None``) of one sample's record file."""
    arm, p, s = key
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
        if not isinstance(rec, dict):
            raise ValueError("not an object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return {}, f"record unreadable ({type(e).__name__})"
    if rec.get("arm") != arm or rec.get("prompt_index") != p or rec.get("sample_index") != s:
        return rec, "record names another sample"
    if p < len(prompts) and rec.get("prompt", "") != prompts[p]:
        return rec, "record has another prompt"
    return rec, None


#: ``NTRK_FULL_CHECK=1``: check every finished sample in full (read its record, hash its PNG),
#: ignoring the stat signatures of the record shards (e.g. after suspected media corruption)
FULL_CHECK_ENV = "NTRK_FULL_CHECK"


class Finished(NamedTuple):
    """What :func:`verify_finished` found."""

    #: finished key -> the PNG checksum its record holds
    sha: dict[layout.Key, Optional[str]]
    #: ``{"key", "problem"}`` of every damaged sample (deleted, to be generated again)
    problems: list[dict[str, Any]]
    #: finished keys whose record line is newer than the shard ``since`` (or checked in full now)
    fresh: list[layout.Key]


def _image_text(base: str, skip: int) -> str:
    rel = base[skip:] + ".png"
    return rel if os.sep == "/" else Path(rel).as_posix()


def _full_check(out: Path, base: str, key: layout.Key, prompts: Sequence[str]) -> tuple[dict[str, Any], Optional[str]]:
    """(record, problem or ``None``): the record file parsed and its PNG's size and checksum checked."""
    rec_path, png_path = Path(base + ".json"), Path(base + ".png")
    rec, reason = _check_record(rec_path, key, prompts)
    if reason is None:
        reason = _check_png(png_path, rec)
    if reason is None:
        rec["image"] = png_path.relative_to(out).as_posix()  # where it is, whatever the layout
    return rec, reason


def _delete_sample(base: str) -> None:
    for f in (base + ".json", base + ".png"):  # record first: never a record without its PNG
        try:
            os.unlink(f)
        except FileNotFoundError:
            pass


def verify_finished(out: Path, arms: Sequence[str], wanted: Container[layout.Key], prompts: Sequence[str],
                    scan: Optional[layout.FolderScan] = None, since: Optional[str] = None) -> Finished:
    """Every requested sample with a record is checked; a sample whose record or PNG is damaged,
    or whose record belongs to another key or prompt, is deleted (record first, so it never
    counts as finished) and reported in ``problems`` to be generated again. Sharded and flat
    (older) folders alike; ``scan`` is the folder's listing (made here when not given).

    The common case costs two ``stat`` calls per sample: a sample whose record shard line carries
    the stat signature its files still have is accepted from the shard (see :mod:`.layout`), and
    the line is read with string methods, not decoded. Everything else gets the full check
    (record parsed, PNG size and sha256): a changed size or mtime, a sample on disk but in no
    shard (a kill between its files and its shard line), a folder from before shards. Samples
    that pass the full check are added to a new shard with their current signature, so the next
    resume takes the quick path for them too. ``fresh`` lists the finished samples whose shard is
    named after ``since`` and those checked in full (see :mod:`.records_file`)."""
    scan = scan if scan is not None else layout.scan_sample_folders(out, arms)
    quick = os.environ.get(FULL_CHECK_ENV, "0") in ("", "0")
    index = layout.read_shard_index(out, prompts)
    sha: dict[layout.Key, Optional[str]] = {}
    problems: list[dict[str, Any]] = []
    fresh: list[layout.Key] = []
    adopted: list[str] = []
    skip, posix, stat = len(f"{out}{os.sep}"), os.sep == "/", os.stat
    for k, base in scan.records.items():
        if k not in wanted:
            continue  # files of other prompt lists/sizes are not this run's
        entry = index.get(k)
        if quick and entry is not None and entry.consistent and entry.signature is not None \
                and entry.image == (base[skip:] + ".png" if posix else _image_text(base, skip)):
            try:  # the stat signature in IndexEntry's form, compared as text
                a, b = stat(base + ".png"), stat(base + ".json")
                same = f"{a.st_size}, {a.st_mtime_ns}, {b.st_size}, {b.st_mtime_ns}" == entry.signature
            except OSError:
                same = False
            if same:
                sha[k] = entry.png_sha256
                if since is not None and entry.source > since:
                    fresh.append(k)
                continue
        rec, reason = _full_check(out, base, k, prompts)
        if reason is not None:
            problems.append({"key": layout.key(*k), "problem": reason})
            _delete_sample(base)
            continue
        sha[k] = rec.get("png_sha256")
        try:
            signature = layout.stat_signature(base + ".png", base + ".json")
        except OSError:
            continue
        if quick or entry is None or entry.signature != ", ".join(map(str, signature)) or not entry.consistent:
            adopted.append(layout.shard_line(json.dumps(json_safe(rec)), signature))
            fresh.append(k)
        elif since is not None and entry.source > since:
            fresh.append(k)  # NTRK_FULL_CHECK of a sample its shard line already signs
    if adopted:
        stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        layout.append_lines(out / layout.RECORD_SHARDS / f"{stamp}.checked.jsonl", adopted)
    return Finished(sha, problems, fresh)


# ---------------------------------------------------------------------------------------------
# Persisted metric states of finished samples
# ---------------------------------------------------------------------------------------------

def state_file_stem(run_id: str, rank: int) -> str:
    return f"{run_id}.rank{rank:05d}"


#: version of a state file's key list; files of other versions are not used (their samples are
#: read back once): version 2 added the sample costs (``metrics.SampleCosts``) and moved the key
#: list from JSON to plain text (a million keys parse in a third of the time)
STATE_FORMAT = 2
#: the key list of a state file: ``<stem>.keys``, a header line, then ``<key> <PNG sha256 or ->``
STATE_KEYS_SUFFIX = ".keys"
_STATE_KEYS_HEADER = f"ntrk metric-state keys, format {STATE_FORMAT}"


def state_keys_text(keys: dict[str, Optional[str]]) -> str:
    """The content of a state file's key list (``key -> PNG checksum``)."""
    return _STATE_KEYS_HEADER + "\n" + "".join(f"{k} {h or '-'}\n" for k, h in keys.items())


def read_state_keys(path: Path) -> Optional[dict[str, str]]:
    """A state file's key list (key -> PNG checksum, ``"-"`` for none), or ``None`` when it is
    unreadable or of another format."""
    try:
        head, _, body = path.read_text(encoding="utf-8").partition("\n")
    except (OSError, UnicodeDecodeError):
        return None
    tokens = body.split()
    if head != _STATE_KEYS_HEADER or len(tokens) % 2:
        return None
    return dict(zip(tokens[::2], tokens[1::2]))


def plan_states(out: Path, finished: dict[layout.Key, Optional[str]],
                texts: Optional[dict[layout.Key, str]] = None) -> tuple[list[str], list[layout.Key]]:
    """(state files to load, finished keys they do not cover). ``finished`` maps each finished
    sample to its PNG checksum (``texts``, if given, to its key as text). A state file counts
    when it is of :data:`STATE_FORMAT`, its key list names only finished samples whose PNG
    checksum is the one it was computed from, and no sample an earlier file already covers; the
    keys no file covers are read back from disk."""
    # key text -> PNG checksum, built once: a state file's check is then one dict look-up per
    # sample it covers; coverage is tracked by key text too (strings cache their hash)
    texts = texts if texts is not None else {k: layout.key(*k) for k in finished}
    sha_by_text = {texts[k]: h or "-" for k, h in finished.items()}
    covered: set[str] = set()
    files: list[str] = []
    folder = out / layout.STATES
    for index in sorted(folder.glob(f"*{STATE_KEYS_SUFFIX}")) if folder.is_dir() else []:
        keys = read_state_keys(index) if index.with_suffix(".pt").is_file() else None
        # every sample still finished, with the checksum the states were computed from
        if keys is None or not all(sha_by_text.get(k) == sha for k, sha in keys.items()):
            continue
        if not covered.isdisjoint(keys):
            continue
        covered.update(keys)
        files.append(index.stem)
    return files, sorted(k for k, t in texts.items() if t not in covered)
