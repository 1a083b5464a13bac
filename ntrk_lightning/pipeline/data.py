"""The items a generation run produces, and the DataModule that serves the unfinished ones.

An item is one requested sample: (prompt index, prompt, sample index, seed). Its seed is derived
from (run seed, prompt index, sample index) alone, so an image does not depend on the batch it
was drawn in, on the number of processes, or on what an earlier, interrupted run had finished.

Resumption: before sharding and before any rank loads a model, rank 0 takes the folder's lock,
checks the run's identity against ``run.json`` and verifies what the output folder already holds
(:mod:`.run`); every rank receives the outcome (one broadcast in ``setup``: the finished samples,
or the one-line error every rank then raises). An item is served with the arms it still lacks,
and dropped when it lacks none. Lightning then shards the remaining items over the ranks with
``UnrepeatedDistributedSamplerWrapper`` (rank r gets items r, r+W, ...: no padding, no duplicates).
Because every rank must get at least one item, a run with fewer remaining items than ranks is
padded with *skip* items, which generate nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["arms"] = list(self.arms)
        return d


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
    """

    def __init__(self, prompts: Optional[list[str]] = None, prompts_file: Optional[str] = None,
                 samples_per_prompt: int = 16, batch_size: int = 16, seed: int = 0,
                 max_prompts: Optional[int] = None, num_workers: int = 0) -> None:
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
        self.items: list[Item] = []          # what this run generates (before sharding)
        self.finished: set[tuple[str, int, int]] = set()  # (arm, prompt, sample) found on disk
        self.problems: list[dict[str, Any]] = []  # damaged samples found (and removed) on disk
        self.identity: Optional[str] = None  # "new", "same", "extended" or "adopted"
        self._lock: Any = None

    @property
    def num_items(self) -> int:
        return len(self.prompts) * self.samples_per_prompt

    def all_items(self, arms: Sequence[str]) -> list[Item]:
        return build_items(self.prompts, self.samples_per_prompt, self.seed, arms)

    def setup(self, stage: Optional[str] = None) -> None:
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        arms = list(getattr(module, "arm_names", ["sample"]))
        out = getattr(module, "output_dir", None)
        requested = self.all_items(arms)
        keys = {(a, it.prompt_index, it.sample_index) for it in requested for a in arms}
        outcome: dict[str, Any] = {"finished": [], "problems": [], "identity": None, "error": None}
        if trainer is None or trainer.is_global_zero:
            if out is not None:
                try:
                    outcome = self._prepare_folder(Path(out), module, arms, keys)
                except (run.RunFolderError, OSError, ValueError) as e:
                    self.release_lock()
                    outcome["error"] = str(e).strip().splitlines()[0] or type(e).__name__
        if trainer is not None and trainer.world_size > 1:
            outcome = trainer.strategy.broadcast(outcome, src=0)
        if outcome["error"]:
            raise run.RunFolderError(outcome["error"])  # every rank: no one waits for the others
        self.finished = {tuple(k) for k in outcome["finished"]}  # type: ignore[misc]
        self.problems = list(outcome["problems"])
        self.identity = outcome["identity"]
        self.items = pending_items(requested, self.finished)
        world = trainer.world_size if trainer is not None else 1
        self.items = pad_for_ranks(self.items, world)

    def _prepare_folder(self, out: Path, module: Any, arms: list[str],
                        keys: set[tuple[str, int, int]]) -> dict[str, Any]:
        """Rank 0, before any rank writes or loads a model: lock, identity, integrity."""
        self._lock = run.RunLock(out)
        self._lock.acquire()
        identity = None
        if hasattr(module, "samplers"):
            identity = run.check_identity(out, run.fingerprint(module, self.prompts, self.seed))
        layout.remove_stale_temporaries(out, arms)
        # files of other prompt lists/sizes are not ours: only the requested keys are checked
        finished, problems = run.verify_finished(out, arms, keys, self.prompts)
        layout.remove_failed(out, arms, keys - finished)  # generated again now
        return {"finished": sorted(finished), "problems": problems, "identity": identity, "error": None}

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
