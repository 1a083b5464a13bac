"""``ntrk evaluate``: metrics of any folder of images, with the same code (and the same DDP
sharding) that scores generation runs, so outputs of other tools are measured identically.

    ntrk evaluate --images DIR [--prompts FILE] [--reference digits|DIR|STATS] [--feature digits]
                  [--clip_model NAME|CONFIG.json --clip_weights FILE] [--rewards CLASS_PATH ...]
                  [--output_dir OUT] [--batch_size 64] [--trainer.devices 2 --trainer.strategy ddp]

Inputs (``--images``):

* a plain folder: the ``.png``/``.jpg``/``.jpeg``/``.webp`` files directly inside it, in sorted
  file-name order, evaluated as one arm named after the folder;
* an ``ntrk predict`` run folder (it holds ``records.jsonl``, see docs/run_format.md): the images
  its records point to, one arm per sampler arm, prompts and prompt indices from the records.

Prompts (``--prompts``, plain folders only; needed for the CLIP score and per-prompt diversity):

* ``*.jsonl``: one object per image, ``{"image": "name.png", "prompt": "...", "prompt_index": 3}``
  (``image`` relative to the folder; ``prompt_index`` optional);
* any other file: plain text, one prompt per line, one line per image in sorted file-name order.

Images sharing a prompt (or a ``prompt_index``) form a group for per-prompt diversity.

Output: ``OUTPUT_DIR/metrics.json`` (written atomically by rank 0, also printed), with the run
format's per-arm fields (``num_samples``, ``rewards``, ``fid``, ``diversity``, ``clip_score``) plus
``diversity_per_group``. Bad input (missing or empty folder, unreadable image, prompt count
mismatch, missing weights) ends with a one-line error and exit status 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ntrk_lightning.fileio import read_jsonl
from ntrk_lightning.runfiles import METRICS, RECORDS
from rewards.base import Reward

#: images per arm in the logged sample grid
GRID_PER_ARM = 8


class EvaluationError(ValueError):
    """Bad input to ``ntrk evaluate``; the message names the file or option."""


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalItem:
    path: Path
    prompt: str
    group: int  # prompt index (-1: none)
    arm: int


@dataclass
class ImageSet:
    """What ``--images`` resolved to: every item in a fixed global order, and the arms."""

    root: Path
    kind: str  # "folder" | "run"
    arms: list[str]
    items: list[EvalItem]
    has_prompts: bool
    counts: dict[str, int] = field(default_factory=dict)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path, EvaluationError)


def _groups_of(prompts: Sequence[str], indices: Sequence[Optional[int]]) -> list[int]:
    """Explicit prompt indices where given, else the order of first appearance of each prompt."""
    first: dict[str, int] = {}
    out = []
    for p, idx in zip(prompts, indices):
        if idx is not None:
            out.append(int(idx))
        else:
            out.append(first.setdefault(p, len(first)))
    return out


def scan_run_folder(root: Path) -> ImageSet:
    rows = _read_jsonl(root / RECORDS)
    if not rows:
        raise EvaluationError(f"{root / RECORDS} has no records")
    arms: list[str] = []
    paths, prompts, indices, arm_idx = [], [], [], []
    for i, r in enumerate(rows, 1):
        if "image" not in r or "arm" not in r:
            raise EvaluationError(f"{root / RECORDS}, record {i}: needs 'arm' and 'image' (docs/run_format.md)")
        arm = str(r["arm"])
        if arm not in arms:
            arms.append(arm)
        p = root / str(r["image"])
        if not p.is_file():
            raise EvaluationError(f"image file missing: {p} (listed in {root / RECORDS})")
        paths.append(p)
        prompts.append(str(r.get("prompt", "") or ""))
        pi = r.get("prompt_index")
        indices.append(int(pi) if pi is not None else None)
        arm_idx.append(arms.index(arm))
    groups = _groups_of(prompts, indices)
    items = [EvalItem(p, pr, g, a) for p, pr, g, a in zip(paths, prompts, groups, arm_idx)]
    return ImageSet(root, "run", arms, items, has_prompts=any(prompts))


def _prompts_for(files: list[Path], root: Path, prompts_file: Path) -> tuple[list[str], list[Optional[int]]]:
    if not prompts_file.is_file():
        raise EvaluationError(f"prompts file not found: {prompts_file}")
    n = len(files)
    if prompts_file.suffix.lower() == ".jsonl":
        by_name: dict[str, tuple[str, Optional[int]]] = {}
        for i, r in enumerate(_read_jsonl(prompts_file), 1):
            if "image" not in r or "prompt" not in r:
                raise EvaluationError(f"{prompts_file}, line {i}: needs 'image' and 'prompt'")
            name = Path(str(r["image"])).name
            if name in by_name:
                raise EvaluationError(f"{prompts_file}: image {name!r} listed twice")
            pi = r.get("prompt_index")
            by_name[name] = (str(r["prompt"]), int(pi) if pi is not None else None)
        missing = [f.name for f in files if f.name not in by_name]
        extra = sorted(set(by_name) - {f.name for f in files})
        if missing or extra:
            raise EvaluationError(
                f"prompts file {prompts_file} does not match the {n} images of {root}: "
                + (f"no prompt for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"no image for {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}" if extra else ""))
        return [by_name[f.name][0] for f in files], [by_name[f.name][1] for f in files]
    try:
        text = prompts_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationError(f"cannot read prompts file {prompts_file}: {e}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    lines = [ln.rstrip("\r") for ln in lines]
    if len(lines) != n:
        raise EvaluationError(f"prompts file {prompts_file} has {len(lines)} lines but {root} has {n} images "
                              "(one prompt per line, one line per image in sorted file-name order)")
    return lines, [None] * n


def scan_folder(root: Path, prompts_file: Optional[Path]) -> ImageSet:
    from metrics.images import list_images

    files = list_images(root)
    if prompts_file is not None:
        prompts, indices = _prompts_for(files, root, prompts_file)
        groups = _groups_of(prompts, indices)
    else:
        prompts, groups = [""] * len(files), [-1] * len(files)
    arm = root.resolve().name or "images"
    items = [EvalItem(f, p, g, 0) for f, p, g in zip(files, prompts, groups)]
    return ImageSet(root, "folder", [arm], items, has_prompts=prompts_file is not None)


#: default pixel cap of ``ntrk evaluate`` (``--max_pixels``): 4096 x 4096
MAX_PIXELS = 4096 * 4096


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header alone (PIL opens lazily: nothing is decoded)."""
    from metrics.images import ImageFolderError
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except Exception as e:
        raise ImageFolderError(f"unreadable or corrupt image file: {path} ({type(e).__name__}: {e})") from None


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise EvaluationError(f"image {path} is {w}x{h} = {w * h} pixels, above the cap of {max_pixels} "
                              "(--max_pixels): resize it, or raise the cap if you have the memory")


class _ItemDataset(Dataset):
    """Items in global order, padded with skip items so that every rank gets at least one."""

    def __init__(self, items: list[EvalItem], length: int) -> None:
        self.items, self.length = items, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i >= len(self.items):
            return {"index": i, "skip": True}
        from metrics.images import ImageFolderError, read_image

        it = self.items[i]
        out: dict[str, Any] = {"index": i, "skip": False, "prompt": it.prompt, "group": it.group, "arm": it.arm}
        try:
            out["image"] = read_image(it.path)
        except ImageFolderError as e:  # reported by every rank together at the end, never a hang
            out["error"] = str(e)
        return out


def _collate(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


class ImageFolderDataModule(LightningDataModule):
    """Images of a folder (or an ``ntrk predict`` run folder) with optional prompts, for predict.

    Args:
        images: the folder (see the module docstring).
        prompts: prompts file for a plain folder (``.jsonl`` with image/prompt pairs, or text
            with one prompt per line in sorted file-name order).
        batch_size: images per batch and rank.
        num_workers: data-loader worker processes.
        verify: check every image file's structure before starting (names a corrupt file early).
        max_pixels: refuse images with more pixels (width x height) than this, read from the file
            header before anything is decoded (a small PNG can decode to gigabytes).
    """

    def __init__(self, images: str = "", prompts: Optional[str] = None, batch_size: int = 32,
                 num_workers: int = 0, verify: bool = True, max_pixels: int = MAX_PIXELS) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(max_pixels) < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.max_pixels = int(max_pixels)
        self.images, self.prompts = images, prompts
        self.batch_size, self.num_workers, self.verify = int(batch_size), int(num_workers), bool(verify)
        self._set: Optional[ImageSet] = None

    def scan(self) -> ImageSet:
        """Resolve and validate the input (cheap; same result on every rank). Raises
        :class:`EvaluationError` / ``metrics.ImageFolderError`` with a one-line message."""
        if self._set is not None:
            return self._set
        if not self.images:
            raise EvaluationError("no images: pass --images DIR")
        root = Path(self.images)
        if not root.exists():
            raise EvaluationError(f"image folder not found: {root}")
        if (root / RECORDS).is_file():
            if self.prompts is not None:
                raise EvaluationError(f"{root} is an ntrk run folder: its prompts come from {RECORDS}; drop --prompts")
            s = scan_run_folder(root)
        else:
            s = scan_folder(root, Path(self.prompts) if self.prompts is not None else None)
        if self.verify:
            from metrics.images import check_image

            for it in s.items:
                _check_pixels(it.path, check_image(it.path), self.max_pixels)
        else:
            for it in s.items:
                _check_pixels(it.path, _header_size(it.path), self.max_pixels)
        s.counts = {a: sum(1 for it in s.items if it.arm == i) for i, a in enumerate(s.arms)}
        self._set = s
        return s

    def setup(self, stage: str) -> None:
        self.scan()

    def predict_dataloader(self) -> DataLoader:
        s = self.scan()
        world = self.trainer.world_size if self.trainer is not None else 1
        ds = _ItemDataset(s.items, max(len(s.items), world))
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=_collate)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

class EvaluationModule(LightningModule):
    """Updates the metrics in ``predict_step``; all ranks compute them in ``on_predict_end``.

    Args:
        feature: extractor for FID and diversity: ``"inception"`` (local weights only),
            ``"digits"`` or an import path ``"package.module:Class"``.
        feature_weights: local InceptionV3 weights file (default: the torch hub cache).
        reference: real images for FID: ``"digits"``/``"digits:R"``, a folder, or a statistics
            file (computed once, cached); ``None``: no FID.
        diversity: compute the mean pairwise feature distance (overall and per prompt).
        clip_model, clip_weights: open_clip model (name, model-config JSON or ``local-dir:``) and
            its local weights file; ``None``: no CLIP score. Needs prompts.
        rewards: reward modules (``class_path``) to summarise per arm.
        output_dir: where ``metrics.json`` goes (``None``: only printed).
        cache_dir: cache for reference statistics (default ``$NTRK_CACHE``).
    """

    def __init__(self, feature: str = "inception", feature_weights: Optional[str] = None,
                 reference: Optional[str] = None, diversity: bool = True, clip_model: Optional[str] = None,
                 clip_weights: Optional[str] = None, rewards: Optional[list[Reward]] = None,
                 output_dir: Optional[str] = None, cache_dir: Optional[str] = None) -> None:
        super().__init__()
        self.feature_spec, self.feature_weights = feature, feature_weights
        self.reference_source = reference
        self.want_diversity = bool(diversity)
        self.clip_model, self.clip_weights = clip_model, clip_weights
        self.rewards = nn.ModuleList(list(rewards or []))
        self.output_dir, self.cache_dir = output_dir, cache_dir
        self.arm_metrics = nn.ModuleDict()
        self.reward_names: list[str] = []
        self.image_set: Optional[ImageSet] = None
        self.results: Optional[dict[str, Any]] = None
        self._errors: list[str] = []
        self._feature: Optional[nn.Module] = None
        self._clip: Optional[nn.Module] = None

    # ---- set-up (before the Trainer launches: errors are one clean line) ----------------------
    def build(self, image_set: ImageSet) -> None:
        """Validate the options against the input and load the feature network and CLIP model
        (the metric groups follow in ``setup``, once the reference statistics are shared)."""
        import metrics as M
        from metrics.reference import check_reference_source

        self.image_set = image_set
        if self.clip_model is not None and not image_set.has_prompts:
            raise EvaluationError("the CLIP score needs prompts: pass --prompts FILE (or evaluate a run folder)")
        for r in self.rewards:
            if getattr(r, "needs_prompts", False) and not image_set.has_prompts:
                raise EvaluationError(f"reward {getattr(r, 'name', type(r).__name__)!r} needs prompts: pass --prompts FILE")
        self.reward_names = _unique_names(self.rewards)
        for r in self.rewards:
            if isinstance(r, Reward):
                r.load()
        if self.reference_source is not None:
            check_reference_source(self.reference_source)
        if self.reference_source is not None or self.want_diversity:
            self._feature = M.build_feature(self.feature_spec, weights_path=self.feature_weights)
        if self.clip_model is not None:
            self._clip = M.OpenCLIPScore(self.clip_model, self.clip_weights)

    def setup(self, stage: str) -> None:
        from metrics.group import build_groups, shared_reference_stats

        if self.image_set is None:  # used without main(): build from the attached data module
            self.build(self.trainer.datamodule.scan())
        reference = None
        if self.reference_source is not None:
            reference = shared_reference_stats(self.reference_source, self._feature, self.trainer.is_global_zero,
                                               lambda: self.trainer.strategy.barrier("ntrk-evaluate-reference"),
                                               cache_dir=self.cache_dir)
        assert self.image_set is not None
        self.arm_metrics = build_groups([f"arm{i}" for i in range(len(self.image_set.arms))], self.reward_names,
                                        self._feature, reference, self.want_diversity, self._clip)

    def on_predict_epoch_start(self) -> None:
        from metrics.group import reset_groups

        self._errors = []
        reset_groups(self.arm_metrics)  # ddp_spawn on CPU shares metric storage between ranks

    # ---- per batch: local updates only, no collectives ----------------------------------------
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0) -> None:
        good = []
        for it in batch:
            if it.get("skip"):
                continue
            if "error" in it:
                self._errors.append(it["error"])
                continue
            good.append(it)
        # sub-batches of one arm and one image shape
        buckets: dict[tuple, list[dict[str, Any]]] = {}
        for it in good:
            buckets.setdefault((it["arm"], tuple(it["image"].shape)), []).append(it)
        for (arm, _), its in buckets.items():
            self._update(arm, its)
        return None

    @torch.no_grad()
    def _update(self, arm: int, its: list[dict[str, Any]]) -> None:
        from metrics.group import update_group

        u8 = torch.stack([it["image"] for it in its]).to(self.device)
        prompts = [it["prompt"] for it in its]
        groups = torch.tensor([it["group"] for it in its], dtype=torch.long, device=self.device)
        update_group(self.arm_metrics[f"arm{arm}"], u8, self._score(arm, u8, prompts), groups, prompts)

    def _score(self, arm: int, u8: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Reward name -> values; a reward that cannot score these images is noted (reported by
        every rank together at the end as one line, never a traceback or a hang)."""
        x = u8.float() / 255.0
        has_prompts = self.image_set is not None and self.image_set.has_prompts
        out = {}
        for name, r in zip(self.reward_names, self.rewards):
            try:
                out[name] = r(x, prompts if has_prompts else None).detach().double()
            except (RuntimeError, ValueError, TypeError) as e:  # e.g. a digits (grey) reward on RGB images
                arm_name = self.image_set.arms[arm] if self.image_set is not None else str(arm)
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self._errors.append(f"reward {name!r} cannot score the images of arm {arm_name!r} "
                                    f"(shape {tuple(u8.shape[1:])}): {reason}")
        return out

    # ---- end: every rank computes (collectives), rank 0 writes --------------------------------
    def on_predict_end(self) -> None:
        errors = self._gather_errors()
        if errors:
            raise EvaluationError(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        s = self.image_set
        assert s is not None
        self.results = self._results(s)
        if self.trainer.is_global_zero:
            self._publish(s)
        self.trainer.strategy.barrier("ntrk-evaluate-end")

    def _results(self, s: ImageSet) -> dict[str, Any]:
        from metrics.features import feature_name
        from metrics.group import summarize_group
        from metrics.reference import describe_source

        arms: dict[str, Any] = {}
        for i, arm in enumerate(s.arms):
            summary = summarize_group(self.arm_metrics[f"arm{i}"], self.reward_names)
            div = summary["diversity"]
            # this command's output keeps diversity flat: the overall value, and per group beside it
            arms[arm] = {"num_samples": s.counts.get(arm, 0), "rewards": summary["rewards"], "fid": summary["fid"],
                         "diversity": div["overall"] if div else None,
                         "diversity_per_group": div["per_group"] if div else None,
                         "clip_score": summary["clip_score"]}
        return {
            "images": str(s.root.resolve()), "kind": s.kind, "num_images": len(s.items),
            "reference": describe_source(self.reference_source) if self.reference_source is not None else None,
            "feature": feature_name(self._feature) if self._feature is not None else None,
            "clip_model": self.clip_model, "clip_weights": self.clip_weights,
            "world_size": self.trainer.world_size, "arms": arms,
        }

    def _publish(self, s: ImageSet) -> None:
        """Rank 0: ``metrics.json``, the loggers, and the results printed."""
        from ntrk_lightning.fileio import atomic_write_json, json_safe

        if self.output_dir is not None:
            atomic_write_json(Path(self.output_dir) / METRICS, self.results)
        if self.trainer.loggers:  # --trainer.logger: final metrics per arm and a sample grid
            from ntrk_lightning.pipeline.loggers import log_run, montage

            firsts = [[it.path for it in s.items if it.arm == a][:GRID_PER_ARM] for a in range(len(s.arms))]
            log_run(self.trainer.loggers, json_safe(self.results), montage(sum(firsts, []), cols=GRID_PER_ARM))
        print(json.dumps(json_safe(self.results), indent=2))

    def _gather_errors(self) -> list[str]:
        from ntrk_lightning.pipeline.distributed import all_gather_objects

        return [e for part in all_gather_objects(list(self._errors)) for e in (part or [])]

    def teardown(self, stage: str) -> None:
        from ntrk_lightning.pipeline.distributed import destroy_process_group

        destroy_process_group()


def _unique_names(rewards: Sequence[Any]) -> list[str]:
    """Each reward's name, made unique with a ``_2``, ``_3`` ... suffix."""
    names: list[str] = []
    for r in rewards:
        base = str(getattr(r, "name", "") or type(r).__name__)
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

#: top-level option -> (class argument it is linked into, type, default, help)
_TOP_LEVEL: dict[str, tuple[str, Any, Any, str]] = {
    "images": ("data.images", Optional[str], None,
               "folder of images, or an `ntrk predict` run folder (holds records.jsonl)"),
    "prompts": ("data.prompts", Optional[str], None,
                "prompts of a plain folder: .jsonl with {image, prompt[, prompt_index]} per line, or text with "
                "one prompt per line in sorted file-name order"),
    "batch_size": ("data.batch_size", int, 32, "images per batch and process"),
    "max_pixels": ("data.max_pixels", int, MAX_PIXELS,
                   "refuse images with more pixels than this (checked in the file header, before decoding)"),
    "reference": ("model.reference", Optional[str], None,
                  "real images for FID: digits | digits:R | a folder of images | a statistics file (omit: no FID)"),
    "feature": ("model.feature", str, "inception",
                "feature extractor for FID and diversity: inception | digits | package.module:Class"),
    "feature_weights": ("model.feature_weights", Optional[str], None,
                        "local InceptionV3 weights (default: $TORCH_HOME/hub/checkpoints/...)"),
    "diversity": ("model.diversity", bool, True, "compute the mean pairwise feature distance"),
    "clip_model": ("model.clip_model", Optional[str], None,
                   "open_clip model name, model-config JSON or local-dir:FOLDER (omit: no CLIP score)"),
    "clip_weights": ("model.clip_weights", Optional[str], None, "local weights file of the CLIP model"),
    "rewards": ("model.rewards", Optional[list[Reward]], None,
                "rewards to summarise, by class_path, e.g. "
                "--rewards+=rewards.digits.DigitClassifierReward --rewards.target 3"),
    "output_dir": ("model.output_dir", Optional[str], None, "folder for metrics.json"),
    "cache_dir": ("model.cache_dir", Optional[str], None, "cache for reference statistics (default $NTRK_CACHE)"),
}


class EvaluateCLI(LightningCLI):
    """LightningCLI of ``ntrk evaluate`` with short top-level options linked into the classes."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name, (target, typ, default, help_) in _TOP_LEVEL.items():
            parser.add_argument(f"--{name}", type=typ, default=default, help=help_)
            parser.link_arguments(name, target, apply_on="parse")


TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
    "enable_model_summary": False,
}


def build_cli(argv: list[str]) -> EvaluateCLI:
    """The parsed and instantiated CLI (model, data module and trainer), without running."""
    from ntrk_lightning.pipeline.cli import check_config_files, install_yaml_bounds

    install_yaml_bounds()
    check_config_files(argv, prog="ntrk evaluate")
    return EvaluateCLI(
        EvaluationModule, ImageFolderDataModule, run=False, args=argv, save_config_callback=None,
        trainer_defaults=dict(TRAINER_DEFAULTS), seed_everything_default=False, auto_configure_optimizers=False,
        parser_kwargs={"prog": "ntrk evaluate",
                       "description": "Metrics (rewards, FID, diversity, CLIP score) of a folder of images."},
    )


def main(argv: list[str]) -> int:
    """``ntrk evaluate ARGS``; returns the exit status (0 ok, 2 bad input)."""
    from metrics.images import ImageFolderError

    user_errors = (EvaluationError, ImageFolderError, FileNotFoundError, ValueError)
    import warnings

    # noise: the dispatcher passes argv explicitly; predict_step returns nothing on purpose
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    warnings.filterwarnings("ignore", message=".*predict returned None.*")
    try:
        try:
            cli = build_cli(list(argv))
        except SystemExit as e:  # --help, or a parse error already printed by the parser
            if isinstance(e.code, str):  # our one-line refusals of a config file
                print(e.code, file=sys.stderr)
            return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
        model, dm, trainer = cli.model, cli.datamodule, cli.trainer
        model.build(dm.scan())
        trainer.predict(model, datamodule=dm, return_predictions=False)
        return 0
    except user_errors as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"ntrk evaluate: error: {msg}", file=sys.stderr)
        return 2
    finally:
        from ntrk_lightning.pipeline.distributed import destroy_process_group

        destroy_process_group(barrier=False)  # normally already done in teardown


if __name__ == "__main__":  # python -m ntrk_lightning.evaluation ...
    sys.exit(main(sys.argv[1:]))
