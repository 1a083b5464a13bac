"""``ntrk_lightning.from_diffusers(pipe)`` on the tiny offline SD 1.x, SDXL, SD3 and FLUX pipelines: the
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


KINDS = {  # pipeline class, backbone built from the folder, modules shared with the pipeline
    "sd": ("StableDiffusionPipeline", "StableDiffusionBackbone", ("unet", "vae", "text_encoder", "tokenizer")),
    "sdxl": ("StableDiffusionXLPipeline", "StableDiffusionXLBackbone",
             ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")),
    "sd3": ("StableDiffusion3Pipeline", "SD3Backbone",
            ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
             "tokenizer_3")),
    "flux": ("FluxPipeline", "FluxBackbone",
             ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")),
}


def _folder(kind: str) -> Path:
    if kind in ("sd", "sdxl"):
        return getattr(tiny_assets(), kind)
    from tiny_flow import tiny_flow_assets

    return getattr(tiny_flow_assets(), kind)


def _pipe(kind: str):
    import diffusers

    folder = _folder(kind)
    return getattr(diffusers, KINDS[kind][0]).from_pretrained(str(folder)), folder


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_modules_are_the_pipelines_own(kind):
    import ntrk_lightning as ntrk

    pipe, _ = _pipe(kind)
    shared = KINDS[kind][2]
    pipe_params = {p.data_ptr() for name in shared if isinstance(getattr(pipe, name), torch.nn.Module)
                   for p in getattr(pipe, name).parameters()}
    sd = ntrk.from_diffusers(pipe)
    for name in shared:
        assert getattr(pipe, name) is not None and getattr(sd.backbone, name) is getattr(pipe, name), name
    # no parameter of the wrapper lives outside the pipeline's storage: nothing was copied
    assert {p.data_ptr() for p in sd.backbone.parameters()} <= pipe_params
    # whatever the pipeline was configured with, the core gets the scheduler it can drive
    want = "DDIMScheduler" if kind in ("sd", "sdxl") else "FlowMatchEulerDiscreteScheduler"
    assert want in [c.__name__ for c in type(sd.scheduler).__mro__]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_sampling_matches_the_backbone_built_from_the_folder(kind):
    import ntrk_lightning as ntrk
    from ntrk_lightning import backbones

    pipe, folder = _pipe(kind)
    sd = ntrk.from_diffusers(pipe, guidance_scale=3.0)
    ref = getattr(backbones, KINDS[kind][1])(str(folder), guidance_scale=3.0)
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

    class KandinskyPipeline:  # stands in for a family without a registered backbone
        pass

    with pytest.raises(ValueError, match=r"KandinskyPipeline is not supported .*StableDiffusionPipeline"):
        ntrk.from_diffusers(KandinskyPipeline())


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
