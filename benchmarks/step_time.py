"""What the step-time benchmarks share (``sd_step_time.py``, ``flow_step_time.py``): the command-line
options, a random aesthetic reward of the real (or tiny) shape, the three samplers timed side by
side on one model, and the result files (JSON + a Markdown table, written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]

# the LAION aesthetic head (CLIP ViT-L/14 image embedding -> 1024 -> 128 -> 64 -> 16 -> 1) and a
# tiny CLIP + head of the same structure
HEAD_DIMS = (768, 1024, 128, 64, 16, 1)
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
TINY_HEAD_DIMS = (32, 16, 8, 8, 4, 1)
REAL_CLIP_MODEL = "ViT-L-14-quickgelu"
#: the aesthetic head's linear layers inside its nn.Sequential (dropouts and activations between)
HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)
#: CLIP's BPE vocabulary: 49408 tokens = 256 bytes x 2 (with and without </w>) + merges + 2 specials
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_TOKENS = 77
PROMPT_SUBJECTS = ("cat", "dog", "horse", "monkey")


_CLIP_TOKENIZERS: dict[tuple[int, str], Any] = {}


def clip_tokenizer(model_max_length: int = CLIP_MAX_TOKENS, pad_token: str = "<|endoftext|>") -> Any:
    """A transformers ``CLIPTokenizer`` with the real CLIP BPE vocabulary (ids match open_clip's),
    built from the BPE file that ships inside the open_clip wheel (offline); cached."""
    key = (model_max_length, pad_token)
    if key in _CLIP_TOKENIZERS:
        return _CLIP_TOKENIZERS[key]
    import gzip

    from open_clip import tokenizer as oc_tok
    from transformers import CLIPTokenizer

    lines = gzip.open(oc_tok.default_bpe()).read().decode("utf-8").split("\n")
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2
    merges = [tuple(m.split()) for m in lines[1:n_merges + 1]]
    chars = list(oc_tok.bytes_to_unicode().values())
    words = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=merges, model_max_length=model_max_length,
                        pad_token=pad_token)
    _CLIP_TOKENIZERS[key] = tok
    return tok


T5_WORDS = ("a an the of photo cat dog horse fox wolf red blue green big small painting on in with and "
            "blurry ugly bird fish cow").split()


def t5_tokenizer(model_max_length: int = 512, words: tuple[str, ...] | list[str] = tuple(T5_WORDS)) -> Any:
    """A transformers ``T5Tokenizer`` (Unigram, tokenizers-backed) with a small vocabulary: T5's
    special ids (<pad> 0, </s> 1, <unk> 2), whole ``words``, and single letters as a fallback."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0 - 0.01 * i) for i, w in enumerate(words)]
    vocab += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def write_random_reward(folder: Path, tiny: bool, seed: int = 1) -> tuple[Path, Path, str]:
    """(head, clip weights, clip model name) of a random aesthetic reward of the real (or tiny) shape."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if tiny:
        cfg = folder / "bench-tiny-clip.json"
        cfg.write_text(json.dumps(TINY_CLIP))
        open_clip.add_model_config(str(cfg))
        model_name, arg_name, dims = "bench-tiny-clip", str(cfg), TINY_HEAD_DIMS
    else:
        model_name = arg_name = REAL_CLIP_MODEL
        dims = HEAD_DIMS
    torch.manual_seed(seed)
    clip = open_clip.create_model(model_name)
    weights = folder / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    del clip
    g = torch.Generator().manual_seed(seed)
    state = {}
    for idx, (i, o) in zip(HEAD_LINEAR_INDICES, zip(dims[:-1], dims[1:])):
        state[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g) / i ** 0.5
        state[f"layers.{idx}.bias"] = torch.zeros(o)
    head = folder / "head.pth"
    torch.save(state, str(head))
    return head, weights, arg_name


def device_tag(device: torch.device, tiny: bool) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    tag = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{tag}-tiny" if tiny else tag


def cpu_name() -> str:
    """The CPU model and core count (``/proc/cpuinfo`` where there is one)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def add_common_arguments(p: argparse.ArgumentParser, batch: int, size: int, steps: int, cuda_dtype: str) -> None:
    """The options both benchmarks take (defaults: real shapes; ``--tiny``: 32 px and 3 steps)."""
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run in seconds)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--size", type=int, default=None, help=f"image size (default {size}; tiny: 32)")
    p.add_argument("--steps", type=int, default=None, help=f"steps per timed run (default {steps}; tiny: 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help=f"backbone and reward compute dtype (default {cuda_dtype} on CUDA, float32 on CPU)")
    p.add_argument("--ntrk-gamma", type=float, default=1.0)
    p.add_argument("--dps-scale", type=float, default=0.1)
    p.add_argument("--head", default=None, help="a real aesthetic head file (with --clip-weights)")
    p.add_argument("--clip-weights", default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))


def device_and_dtype(args: argparse.Namespace, cuda_dtype: str) -> tuple[torch.device, str]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, args.dtype or (cuda_dtype if device.type == "cuda" else "float32")


def reward_files(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, str]:
    """The real reward files given on the command line, else a random reward written to ``tmp``."""
    if args.head and args.clip_weights:
        return Path(args.head), Path(args.clip_weights), REAL_CLIP_MODEL
    return write_random_reward(tmp / "reward", args.tiny)


def load_on_device(backbone: Any, reward_files: tuple[Path, Path, str], dtype: str, device: torch.device) -> Any:
    """Load the backbone and the aesthetic reward, move both to ``device``; returns the reward."""
    from rewards.aesthetic import LAIONAestheticReward

    head, clip_weights, clip_model = reward_files
    reward = LAIONAestheticReward(head=str(head), clip_weights=str(clip_weights), clip_model=clip_model, dtype=dtype)
    backbone.load()
    reward.load()
    backbone.to(device)
    reward.to(device)
    return reward


def measure(model: Any, scheduler: Any, reward: Any, spec: Any, steps: int, seeds: list[int], cond: Any,
            prompts: list[str], device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    from ntrk_lightning import sample

    for _ in range(warmup):
        sample(model, scheduler, reward, spec, steps, seed=seeds, cond=cond, prompts=prompts, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, res = [], None
    for _ in range(repeats):
        res = sample(model, scheduler, reward, spec, steps, seed=seeds, cond=cond, prompts=prompts, device=device)
        times.append(res.seconds)  # sample() synchronises CUDA before reading the clock
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    best = min(times)
    return {"sampler": spec.describe(), "steps": steps, "batch": len(seeds), "repeats": repeats,
            "seconds_per_run": times, "seconds_per_step": best / steps,
            "ms_per_step": 1000.0 * best / steps, "ms_per_step_per_image": 1000.0 * best / steps / len(seeds),
            "nfe_per_sample": res.nfe, "grad_evals_per_sample": res.grad_evals,
            "peak_memory_bytes": peak,
            "peak_memory_gib": None if peak is None else peak / 2 ** 30,
            "reward_mean": float(res.rewards.float().mean())}


def time_samplers(backbone: Any, reward: Any, args: argparse.Namespace, steps: int,
                  device: torch.device) -> dict[str, dict[str, Any]]:
    """Plain, DPS and NTRK on the same model, reward, prompts and seeds, one after the other."""
    from ntrk_lightning.samplers import DPS, NTRK, Plain

    model, scheduler = backbone.model(), backbone.make_scheduler()
    prompts = [f"a photo of a {PROMPT_SUBJECTS[i % len(PROMPT_SUBJECTS)]}" for i in range(args.batch)]
    cond = backbone.conditioning(prompts)
    seeds = list(range(args.batch))
    samplers = {"plain": Plain(), "dps": DPS(scale=args.dps_scale), "ntrk": NTRK(mode="tilt", gamma=args.ntrk_gamma)}
    results = {}
    for name, spec in samplers.items():
        results[name] = measure(model, scheduler, reward, spec, steps, seeds, cond, prompts, device,
                                args.warmup, args.repeats)
        mem = results[name]["peak_memory_gib"]
        print(f"{name}: {results[name]['ms_per_step']:.1f} ms/step, peak "
              f"{'n/a' if mem is None else f'{mem:.2f}'} GiB", flush=True)
    return results


def write_outputs(out: Path, stem: str, result: dict[str, Any], title: str, description: str) -> tuple[Path, Path]:
    """``<out>/<stem>.json`` (the result) and ``.md`` (``title``, ``description``, one table row per
    sampler), both written atomically."""
    from ntrk_lightning.fileio import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    lines = [f"# {title}", "", description, "",
             "| sampler | ms / step | ms / step / image | NFE / image | reward grads / image | peak memory (GiB) |",
             "|---|---|---|---|---|---|"]
    for name, r in result["samplers"].items():
        mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        lines.append(f"| {name} | {r['ms_per_step']:.1f} | {r['ms_per_step_per_image']:.1f} | {r['nfe_per_sample']:.0f} "
                     f"| {r['grad_evals_per_sample']:.0f} | {mem} |")
    lines += ["", "Per-step time = best wall time of `ntrk_lightning.sample` over the repeats / steps (final decode "
              "and reward included); peak memory = `torch.cuda.max_memory_allocated` over the timed runs.", ""]

    def writer(text: str) -> Callable[[str], None]:
        return lambda tmp: Path(tmp).write_text(text)

    atomic_write(json_path, writer(json.dumps(result, indent=2) + "\n"))
    atomic_write(md_path, writer("\n".join(lines)))
    return json_path, md_path
