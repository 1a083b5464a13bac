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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from ntrk_lightning.noise import derive_seed
from ntrk_lightning.pipeline import layout, run


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


def build_items(prompts: Sequence[str], samples_per_prompt: int, seed: int,
                arms: Sequence[str]) -> list[Item]:
    """Every requested item of a run (all arms pending), ordered by (prompt, sample)."""
    return [Item(p, text, s, derive_seed(seed, p, s), tuple(arms))
            for p, text in enumerate(prompts) for s in range(samples_per_prompt)]


def pending_items(items: Sequence[Item], finished: set[tuple[str, int, int]]) -> list[Item]:
    """Items with the arms they still lack; items lacking none are dropped."""
    out = []
    for it in items:
        todo = tuple(a for a in it.arms if (a, it.prompt_index, it.sample_index) not in finished)
        if todo:
            out.append(Item(it.prompt_index, it.prompt, it.sample_index, it.seed, todo))
    return out


def pad_for_ranks(items: list[Item], world_size: int) -> list[Item]:
    """Append skip items so that each of ``world_size`` ranks gets at least one item."""
    missing = max(0, world_size - len(items))
    return items + [Item(-1, "", -1, 0, ()) for _ in range(missing)]


@dataclass
class Resume:
    """What rank 0 found in the output folder, shared with every rank by one broadcast.

    ``records`` (finished key -> verified record) is kept on rank 0 only: the other ranks need
    the keys (in ``reread``/``state_files`` plans), not the records."""

    finished: list[layout.Key] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)
    identity: Optional[str] = None
    #: persisted metric states covering finished samples (file stems under ``metric_states/``)
    state_files: list[str] = field(default_factory=list)
    #: finished samples no state file covers: read back from disk once, then persisted
    reread: list[layout.Key] = field(default_factory=list)
    records: dict[layout.Key, dict[str, Any]] = field(default_factory=dict)
    error: Optional[str] = None
    #: finished key -> the record's JSON text (its ``records.jsonl`` line; rank 0 only)
    lines: dict[layout.Key, str] = field(default_factory=dict)

    def shared(self) -> "Resume":
        """The part every rank receives (no records)."""
        return Resume(self.finished, self.problems, self.identity, self.state_files, self.reread, {}, self.error)


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

    def all_items(self, arms: Sequence[str]) -> list[Item]:
        return build_items(self.prompts, self.samples_per_prompt, self.seed, arms)

    def setup(self, stage: Optional[str] = None) -> None:
        trainer = self.trainer
        requested = self.all_items(self.arms)
        outcome = Resume()
        if (trainer is None or trainer.is_global_zero) and self.output_dir is not None:
            keys = {(a, it.prompt_index, it.sample_index) for it in requested for a in self.arms}
            try:
                outcome = self._prepare_folder(Path(self.output_dir), keys)
            except (run.RunFolderError, OSError, ValueError) as e:
                self.release_lock()
                outcome.error = str(e).strip().splitlines()[0] or type(e).__name__
        shared = outcome.shared()
        if trainer is not None and trainer.world_size > 1:
            shared = trainer.strategy.broadcast(shared, src=0)
        if shared.error:
            raise run.RunFolderError(shared.error)  # every rank: no one waits for the others
        shared.records, shared.lines = outcome.records, outcome.lines  # rank 0's
        self.resume = shared
        self.items = pending_items(requested, {tuple(k) for k in shared.finished})  # type: ignore[misc]
        world = trainer.world_size if trainer is not None else 1
        self.items = pad_for_ranks(self.items, world)

    def _prepare_folder(self, out: Path, keys: set[layout.Key]) -> Resume:
        """Rank 0, before any rank writes or loads a model: lock, identity, integrity, plan."""
        self._lock = run.RunLock(out)
        self._lock.acquire()
        identity = None
        if self.fingerprint is not None:
            fp = {**self.fingerprint(), "seed": self.seed, "prompts": list(self.prompts)}
            identity = run.check_identity(out, fp)
        layout.remove_stale_temporaries(out, self.arms)
        # files of other prompt lists/sizes are not ours: only the requested keys are checked
        found = run.verify_finished(out, self.arms, keys, self.prompts)
        layout.remove_failed(out, self.arms, keys - set(found.records))  # generated again now
        state_files, reread = run.plan_states(out, found.records)
        return Resume(sorted(found.records), found.problems, identity, state_files, reread, found.records,
                      lines=found.lines)

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
