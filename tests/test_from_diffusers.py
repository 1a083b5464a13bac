"""``ntrk_lightning.from_diffusers(pipe)`` on the tiny offline SD 1.x and SDXL pipelines: the
pipeline's modules are shared (same objects, no copied parameters), sampling matches the backbone
built from the same folder, unsupported pipelines fail with their class name, and the README
example runs (with the tiny folder in place of a real one)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_sd import tiny_assets

REPO = Path(__file__).resolve().parents[1]


def brightness(images, prompts=None):
    return images.mean(dim=(1, 2, 3))


def _pipe(kind: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline if kind == "sd" else StableDiffusionXLPipeline
    folder = getattr(tiny_assets(), kind)
    return cls.from_pretrained(str(folder)), folder


SHARED = {"sd": ("unet", "vae", "text_encoder", "tokenizer"),
          "sdxl": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_modules_are_the_pipelines_own(kind):
    import ntrk_lightning as ntrk

    pipe, _ = _pipe(kind)
    pipe_params = {p.data_ptr() for name in SHARED[kind] if isinstance(getattr(pipe, name), torch.nn.Module)
                   for p in getattr(pipe, name).parameters()}
    sd = ntrk.from_diffusers(pipe)
    for name in SHARED[kind]:
        assert getattr(sd.backbone, name) is getattr(pipe, name), name
    # no parameter of the wrapper lives outside the pipeline's storage: nothing was copied
    assert {p.data_ptr() for p in sd.backbone.parameters()} <= pipe_params
    assert sd.model.sample_shape == (4, 8, 8)
    assert type(sd.scheduler).__name__ == "DDIMScheduler"  # whatever the pipeline was configured with


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_sampling_matches_the_backbone_built_from_the_folder(kind):
    import ntrk_lightning as ntrk
    from ntrk_lightning.backbones import StableDiffusionBackbone, StableDiffusionXLBackbone

    pipe, folder = _pipe(kind)
    sd = ntrk.from_diffusers(pipe, guidance_scale=3.0)
    ref = (StableDiffusionBackbone if kind == "sd" else StableDiffusionXLBackbone)(str(folder), guidance_scale=3.0)
    ref.load()
    prompts = ["a cat", "a dog"]
    spec = ntrk.NTRK()
    res = sd.sample(prompts, brightness, spec, num_steps=3, seed=[11, 12])
    want = ntrk.sample(ref.model(), ref.make_scheduler(), brightness, spec, 3, seed=[11, 12],
                       cond=ref.conditioning(prompts), prompts=prompts)
    torch.testing.assert_close(res.images, want.images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.rewards, want.rewards, atol=1e-6, rtol=1e-6)
    # the conditioning really follows the prompt: another prompt gives another image
    other = sd.sample(["a red car", "a dog"], brightness, spec, num_steps=3, seed=[11, 12])
    assert not torch.allclose(other.images[0], res.images[0], atol=1e-4)
    torch.testing.assert_close(other.images[1], res.images[1], atol=1e-5, rtol=1e-5)


def test_unsupported_pipeline_names_its_class():
    import ntrk_lightning as ntrk

    class FluxPipeline:  # stands in for a family without a registered backbone
        pass

    with pytest.raises(ValueError, match=r"FluxPipeline is not supported .*StableDiffusionPipeline"):
        ntrk.from_diffusers(FluxPipeline())


def test_file_options_are_refused():
    import ntrk_lightning as ntrk

    pipe, _ = _pipe("sd")
    with pytest.raises(TypeError, match="vae"):
        ntrk.from_diffusers(pipe, vae="/somewhere")


@pytest.mark.slow
def test_readme_example_runs_on_the_tiny_pipeline(tmp_path):
    readme = (REPO / "README.md").read_text()
    (code,) = re.findall(r"```python stable-diffusion\n(.*?)```", readme, flags=re.S)
    assert '"/models/stable-diffusion-v1-5"' in code
    code = code.replace('"/models/stable-diffusion-v1-5"', repr(str(tiny_assets().sd)))
    code = re.sub(r"num_steps=\d+", "num_steps=3", code)
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1",
                                            "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reward" in proc.stdout
