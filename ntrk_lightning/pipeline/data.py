"""The items a generation run produces, and the DataModule that serves the unfinished ones.

An item is one requested sample: (prompt index, prompt, sample index, seed). Its seed is derived
from (run seed, prompt index, sample index) alone, so an image does not depend on the batch it
was drawn in, on the number of processes, or on what an earlier, interrupted run had finished.

The arms and the output folder come from the CLI (``ntrk predict`` links them from the
generation module's configuration, :mod:`.cli`), and so does the run's fingerprint (a callable,
evaluated by rank 0 only): the data module never looks at the model.

Resumption: before sharding and before any rank loads a model, rank 0 takes the folder's lock,
checks the run's identity against ``run.json``, verifies what the output folder already holds
and plans how the finished samples reach the metrics (:mod:`.run`); every rank receives the
outcome (one broadcast in ``setup``: a :class:`Resume`, or the one-line error every rank then
raises). An item is served with the arms it still lacks,
and dropped when it lacks none. Lightning then shards the remaining items over the ranks with
``UnrepeatedDistributedSamplerWrapper`` (rank r gets items r, r+W, ...: no padding, no duplicates).
Because every rank must get at least one item, a run with fewer remaining items than ranks is
padded with *skip* items, which generate nothing.
"""

from __future__ import annotations

import gc
import heapq
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Container, Iterable, Iterator, Optional, Sequence

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from ntrk_lightning.noise import derive_seed
from ntrk_lightning.pipeline import layout, records_file, run


@dataclass(frozen=True)
class Item:
    prompt_index: int
    prompt: str
    sample_index: int
    seed: int
    #: arms that still have to generate this item (empty: a skip item)
    arms: tuple[str, ...] = field(default=())

    @property
    def skip(self) -> bool:
        return not self.arms


class _Items(Dataset):
    def __init__(self, items: Sequence[Item]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]


def collate_items(batch: list[Item]) -> list[Item]:
    """Items stay Python objects: prompts are strings and seeds are 63-bit integers."""
    return list(batch)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: ``.txt`` (one per line; blank lines and lines starting with ``#`` are
    ignored), ``.json`` (a list of strings) or ``.jsonl`` (objects with a ``prompt`` field)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
            raise ValueError(f"{p}: expected a JSON list of strings")
        return data
    if p.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise ValueError(f"{p}:{n}: expected an object with a string 'prompt'")
                out.append(obj["prompt"])
        return out
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def items_of(prompts: Sequence[str], seed: int, pending: Sequence[tuple[int, int, tuple[str, ...]]]) -> list[Item]:
    """Items of (prompt index, sample index, arms still to generate) triples, with their seeds."""
    return [Item(p, prompts[p], s, derive_seed(seed, p, s), arms) for p, s, arms in pending]


class Requested:
    """The keys a run requests, (arm, prompt, sample) for every arm, prompt and sample index: a
    rectangle, tested in constant time (``key in requested``)."""

    def __init__(self, arms: Sequence[str], num_prompts: int, samples_per_prompt: int) -> None:
        self.arms, self.num_prompts, self.samples_per_prompt = tuple(arms), int(num_prompts), int(samples_per_prompt)
        self._arms = set(self.arms)

    def __contains__(self, k: object) -> bool:
        try:
            arm, p, s = k  # type: ignore[misc]
            return arm in self._arms and 0 <= p < self.num_prompts and 0 <= s < self.samples_per_prompt
        except (TypeError, ValueError):
            return False

    def pending(self, finished: Container[tuple[str, int, int]]) -> list[tuple[int, int, tuple[str, ...]]]:
        """(prompt, sample, arms still to generate) of every requested item not finished in every arm."""
        out = []
        arms = self.arms
        for p in range(self.num_prompts):
            for s in range(self.samples_per_prompt):
                todo = [a for a in arms if (a, p, s) not in finished]
                if todo:
                    out.append((p, s, tuple(todo)))
        return out


def pad_for_ranks(items: list[Item], world_size: int) -> list[Item]:
    """Append skip items so that each of ``world_size`` ranks gets at least one item."""
    missing = max(0, world_size - len(items))
    return items + [Item(-1, "", -1, 0, ()) for _ in range(missing)]


#: finished images per arm remembered for the report's sample grid
GRID_SAMPLES = 16


@dataclass
class Resume:
    """What rank 0 found in the output folder, shared with every rank by one broadcast.

    Everything here is small or proportional to the work left (nothing per finished sample is
    sent); ``records_plan`` and ``first_images`` are kept on rank 0 only."""

    #: (prompt, sample, arms still to generate) of every item this run generates
    pending: list[tuple[int, int, tuple[str, ...]]] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)
    identity: Optional[str] = None
    #: persisted metric states covering finished samples (file stems under ``metric_states/``)
    state_files: list[str] = field(default_factory=list)
    #: finished samples no state file covers: read back from disk once, then persisted
    reread: list[layout.Key] = field(default_factory=list)
    error: Optional[str] = None
    #: how the end of the run updates ``records.jsonl`` (rank 0 only)
    records_plan: Optional[records_file.Plan] = None
    #: arm -> (prompt, sample, image path) of its first finished samples by key (rank 0 only)
    first_images: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)

    def shared(self) -> "Resume":
        """The part every rank receives."""
        return Resume(self.pending, self.problems, self.identity, self.state_files, self.reread, self.error)


def first_images(scan: layout.FolderScan, finished: Container[layout.Key], requested: Requested, out: Path,
                 n: int = GRID_SAMPLES) -> dict[str, list[tuple[int, int, str]]]:
    """arm -> its ``n`` first finished samples by (prompt, sample), with their image paths (walks
    the request in order: usually only its first samples)."""
    skip = len(f"{out}{os.sep}")
    found: dict[str, list[tuple[int, int, str]]] = {}
    for arm in requested.arms:
        mine = found.setdefault(arm, [])
        for p in range(requested.num_prompts):
            for s in range(requested.samples_per_prompt):
                if (arm, p, s) in finished:
                    mine.append((p, s, Path(scan.records[(arm, p, s)][skip:] + ".png").as_posix()))
                    if len(mine) == n:
                        break
            if len(mine) == n:
                break
    return found


@contextmanager
def _cycle_collector_paused() -> Iterator[None]:
    """Pause Python's cycle collector: a resume builds a few small objects per finished sample
    (keys, index entries), hundreds of thousands that hold no cycle, and the collector would walk
    them again and again as they accumulate (about a sixth of the resume at 100k samples,
    benchmarks/run_folder_scale.py) without ever freeing one."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class PromptDataModule(pl.LightningDataModule):
    """Prompts x samples per prompt, minus what the output folder already holds.

    Args:
        prompts: inline prompts; ``None`` with no ``prompts_file`` means one empty prompt (an
            unconditional model).
        prompts_file: a ``.txt``/``.json``/``.jsonl`` file of prompts (see :func:`read_prompts`).
        samples_per_prompt: samples generated for every prompt (by every arm).
        batch_size: items per ``predict_step`` (SMC/best-of-N/SVDD multiply the rows inside).
        seed: the run seed from which every sample's seed is derived.
        max_prompts: use only the first ``max_prompts`` prompts (quick trials of a long list).
        arms: the arm names (linked from the model's ``samplers`` by ``ntrk predict``).
        output_dir: the run folder (linked from ``--output_dir``); ``None``: nothing is resumed.
        fingerprint: callable giving the model's part of the run identity (set by the CLI);
            ``None``: no identity check.
    """

    def __init__(self, prompts: Optional[list[str]] = None, prompts_file: Optional[str] = None,
                 samples_per_prompt: int = 16, batch_size: int = 16, seed: int = 0,
                 max_prompts: Optional[int] = None, num_workers: int = 0, arms: Optional[list[str]] = None,
                 output_dir: Optional[str] = None) -> None:
        super().__init__()
        if prompts is not None and prompts_file is not None:
            raise ValueError("give prompts or prompts_file, not both")
        if int(samples_per_prompt) < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if prompts_file is not None:
            prompts = read_prompts(prompts_file)
        elif prompts is None:
            prompts = [""]
        prompts = [str(p) for p in prompts]
        if max_prompts is not None:
            prompts = prompts[: int(max_prompts)]
        if not prompts:
            raise ValueError(f"the prompt list is empty{f' ({prompts_file})' if prompts_file else ''}")
        self.prompts = prompts
        self.samples_per_prompt = int(samples_per_prompt)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.arms = list(arms) if arms else ["sample"]
        self.output_dir = output_dir
        #: the model's part of the run fingerprint, as a callable (set by the CLI)
        self.fingerprint: Optional[Callable[[], dict[str, Any]]] = None
        self.items: list[Item] = []          # what this run generates (before sharding)
        self.resume = Resume()               # what the output folder held
        self._lock: Any = None

    def setup(self, stage: Optional[str] = None) -> None:
        trainer = self.trainer
        requested = Requested(self.arms, len(self.prompts), self.samples_per_prompt)
        outcome = Resume(pending=[])
        if (trainer is None or trainer.is_global_zero) and self.output_dir is not None:
            try:
                with _cycle_collector_paused():
                    outcome = self._prepare_folder(Path(self.output_dir), requested)
            except (run.RunFolderError, OSError, ValueError) as e:
                self.release_lock()
                outcome.error = str(e).strip().splitlines()[0] or type(e).__name__
        elif self.output_dir is None:
            outcome.pending = requested.pending(())
        shared = outcome.shared()
        if trainer is not None and trainer.world_size > 1:
            shared = trainer.strategy.broadcast(shared, src=0)
        if shared.error:
            raise run.RunFolderError(shared.error)  # every rank: no one waits for the others
        shared.records_plan, shared.first_images = outcome.records_plan, outcome.first_images  # rank 0's
        self.resume = shared
        # seeds are derived for the items this run generates only, not for the finished ones
        self.items = items_of(self.prompts, self.seed, shared.pending)
        world = trainer.world_size if trainer is not None else 1
        self.items = pad_for_ranks(self.items, world)

    def _prepare_folder(self, out: Path, requested: Requested) -> Resume:
        """Rank 0, before any rank writes or loads a model: lock, identity, integrity, plans."""
        self._lock = run.RunLock(out)
        self._lock.acquire()
        identity = None
        if self.fingerprint is not None:
            fp = {**self.fingerprint(), "seed": self.seed, "prompts": list(self.prompts)}
            identity = run.check_identity(out, fp)
        scan = layout.scan_sample_folders(out, self.arms)  # one listing for everything below
        layout.remove_files(scan.temporaries)
        synced = records_file.read_synced(out)
        # files of other prompt lists/sizes are not ours: only the requested keys are checked
        found = run.verify_finished(out, self.arms, requested, self.prompts, scan,
                                    since=synced.shards_through if synced else None)
        # failure markers of requested samples that are not finished: generated again now
        layout.remove_files(path for k, path in scan.failed.items() if k in requested and k not in found.sha)
        texts = {k: records_file.key_text(k) for k in found.sha}  # once, for both plans
        state_files, reread = run.plan_states(out, found.sha, texts)
        return Resume(requested.pending(found.sha), found.problems, identity, state_files, reread,
                      records_plan=records_file.plan(synced, texts, found.fresh),
                      first_images=first_images(scan, found.sha, requested, out))

    @property
    def generated_this_run(self) -> int:
        """Samples this run generates (every arm an item still lacks)."""
        return sum(len(it.arms) for it in self.items)

    def release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def teardown(self, stage: Optional[str] = None) -> None:
        self.release_lock()

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(_Items(self.items), batch_size=self.batch_size, shuffle=False,
                          collate_fn=collate_items, num_workers=self.num_workers)

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        # Items are plain Python (prompts, 63-bit seeds; frozen, which Lightning's default mover
        # rejects); the generation module makes its tensors on the device. The hook lives here,
        # with the data, so Lightning does not warn that a module override shadows it.
        return batch
