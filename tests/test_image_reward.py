"""ImageReward on a tiny random model (offline): file checks, the published constants, agreement of
the encoders with transformers' independent BLIP port, the score normalisation, gradients."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tiny_flow import TINY_IMAGE_REWARD_ARCH, make_tiny_image_reward


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tiny_image_reward(tmp_path_factory.mktemp("image_reward"))


@pytest.fixture(scope="module")
def reward(files):
    from rewards.image_reward import ImageReward

    return ImageReward(str(files[0]), str(files[1]), arch=TINY_IMAGE_REWARD_ARCH, dtype="float32").load()


def test_published_constants_and_default_architecture():
    """The constants of the reference implementation (THUDM/ImageReward, ImageReward.py: mean,
    std, _transform(224) with CLIP's normalisation, max_length=35, MLP 768-1024-128-64-16-1)."""
    from rewards import image_reward as ir

    assert ir.REWARD_MEAN == 0.16717362830052426 and ir.REWARD_STD == 1.0333394966054072
    assert ir.IMAGE_SIZE == 224 and ir.MAX_PROMPT_TOKENS == 35
    assert ir.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert ir.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    arch = ir.ImageRewardArch()
    assert (arch.patch_size, arch.vision_width, arch.vision_layers, arch.vision_heads) == (16, 1024, 24, 16)
    assert (arch.text_width, arch.text_layers, arch.text_heads, arch.text_vocab_size) == (768, 12, 12, 30524)
    assert arch.head_dims == (768, 1024, 128, 64, 16, 1)
    head = ir.RewardHead(arch.head_dims)
    assert sorted({k.split(".")[1] for k in head.state_dict()}) == ["0", "2", "4", "6", "7"]


def test_missing_files_fail_with_the_path_and_how_to_get_them(files, tmp_path):
    from rewards.image_reward import ImageReward

    with pytest.raises(FileNotFoundError, match=r"ImageReward checkpoint not found: .*nowhere/ImageReward.pt.*hf download THUDM/ImageReward"):
        ImageReward(str(tmp_path / "nowhere" / "ImageReward.pt"), str(files[1]))
    with pytest.raises(FileNotFoundError, match=r"BERT tokenizer folder not found: .*no-tok.*bert-base-uncased"):
        ImageReward(str(files[0]), str(tmp_path / "no-tok"))
    (tmp_path / "empty-tok").mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither tokenizer.json nor vocab.txt"):
        ImageReward(str(files[0]), str(tmp_path / "empty-tok"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello world")
    r = ImageReward(str(junk), str(files[1]), arch=TINY_IMAGE_REWARD_ARCH)
    with pytest.raises(ValueError, match=r"junk.pt is not a weights file"):
        r.load()
    # the tiny checkpoint read with the released architecture: one line naming the mismatch
    r = ImageReward(str(files[0]), str(files[1]))
    with pytest.raises(ValueError, match=r"ImageReward-tiny.pt does not match .*missing \d+ keys.*matching `arch`"):
        r.load()
    # same depths, other widths: the shapes are named
    wide = {**TINY_IMAGE_REWARD_ARCH, "text_intermediate": 40}
    with pytest.raises(ValueError, match=r"ImageReward-tiny.pt: \d+ tensors have other shapes .*intermediate.*"
                                         r"pass the matching `arch`"):
        ImageReward(str(files[0]), str(files[1]), arch=wide).load()
    # a checkpoint of something else
    other = tmp_path / "other.pt"
    torch.save({"layers.0.weight": torch.zeros(1, 2)}, str(other))
    with pytest.raises(ValueError, match=r"does not match the ImageReward architecture: missing"):
        ImageReward(str(other), str(files[1]), arch=TINY_IMAGE_REWARD_ARCH).load()
    with pytest.raises(ValueError, match=r"unknown fields \['depth'\]"):
        ImageReward(str(files[0]), str(files[1]), arch={"depth": 3})


def test_checkpoint_round_trip_safetensors_and_unused_keys(files, reward, tmp_path):
    """The torch checkpoint (with the release's unused BLIP projections) and a safetensors copy of
    it load to the same weights; scores agree."""
    from safetensors.torch import save_file

    from rewards.image_reward import ImageReward

    state = torch.load(str(files[0]), weights_only=True)
    assert "blip.vision_proj.weight" in state and "blip.text_encoder.embeddings.position_ids" in state
    loaded = reward.model.state_dict()
    for k, v in loaded.items():
        torch.testing.assert_close(v, state[k])
    st = tmp_path / "ImageReward.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    arch_json = tmp_path / "arch.json"
    arch_json.write_text(json.dumps(TINY_IMAGE_REWARD_ARCH))
    r2 = ImageReward(str(st), str(files[1]), arch=str(arch_json), dtype="float32").load()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 40, 40)
    torch.testing.assert_close(r2(x, ["a cat", "a dog"]), reward(x, ["a cat", "a dog"]))


def _blip_reference(reward):
    """transformers' BLIP port (BlipVisionModel, BlipTextModel: an independent implementation of
    BLIP's ViT and multimodal BERT) holding the tiny model's weights."""
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    a = reward.arch
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=a.vision_width, intermediate_size=4 * a.vision_width, num_hidden_layers=a.vision_layers,
        num_attention_heads=a.vision_heads, image_size=a.image_size, patch_size=a.patch_size, hidden_act="gelu",
        layer_norm_eps=1e-6)).eval()
    text = BlipTextModel(BlipTextConfig(
        vocab_size=a.text_vocab_size, hidden_size=a.text_width, encoder_hidden_size=a.vision_width,
        intermediate_size=a.text_intermediate, num_hidden_layers=a.text_layers, num_attention_heads=a.text_heads,
        max_position_embeddings=a.text_max_positions, hidden_act="gelu", layer_norm_eps=a.text_layer_norm_eps),
        add_pooling_layer=False).eval()
    ours = reward.model.blip
    vs = {"embeddings.class_embedding": ours.visual_encoder.cls_token,
          "embeddings.position_embedding": ours.visual_encoder.pos_embed,
          "embeddings.patch_embedding.weight": ours.visual_encoder.patch_embed.proj.weight,
          "embeddings.patch_embedding.bias": ours.visual_encoder.patch_embed.proj.bias,
          "post_layernorm.weight": ours.visual_encoder.norm.weight, "post_layernorm.bias": ours.visual_encoder.norm.bias}
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
             "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i, blk in enumerate(ours.visual_encoder.blocks):
        for mine, theirs in names.items():
            mod = blk.get_submodule(mine)
            vs[f"encoder.layers.{i}.{theirs}.weight"] = mod.weight
            vs[f"encoder.layers.{i}.{theirs}.bias"] = mod.bias
    missing, unexpected = vision.load_state_dict({k: v.detach() for k, v in vs.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k], (missing, unexpected)
    # the multimodal BERT's keys are BLIP's own in both
    missing, unexpected = text.load_state_dict(ours.text_encoder.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k], (missing, unexpected)
    return vision, text


def test_encoders_agree_with_transformers_blip_port(reward):
    """Image tokens and the text [CLS] feature equal those of transformers' BLIP classes with the
    same weights; the score is (head([CLS]) - mean) / std with the published constants."""
    from rewards.image_reward import REWARD_MEAN, REWARD_STD

    vision, text = _blip_reference(reward)
    torch.manual_seed(1)
    images = torch.rand(3, 3, 48, 40)
    prompts = ["a photo of a cat", "a red fox", "dog"]
    pixels = reward.preprocess(images)
    ids, mask = reward.tokens(prompts, torch.device("cpu"))
    assert ids.shape == (3, 35) and int(mask[2].sum()) == 3  # [CLS] dog [SEP], then padding
    with torch.no_grad():
        ours_img = reward.model.blip.visual_encoder(pixels)
        ref_img = vision(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(ours_img, ref_img, rtol=1e-4, atol=1e-5)
        ours_txt = reward.model.blip.text_encoder(ids, mask, ours_img)
        ref_txt = text(input_ids=ids, attention_mask=mask, encoder_hidden_states=ref_img,
                       encoder_attention_mask=torch.ones(ref_img.shape[:2], dtype=torch.long),
                       is_decoder=False).last_hidden_state
        torch.testing.assert_close(ours_txt[:, 0], ref_txt[:, 0], rtol=1e-4, atol=1e-5)
        raw = reward.model.mlp(ref_txt[:, 0]).squeeze(-1)
        expected = (raw - REWARD_MEAN) / REWARD_STD
        torch.testing.assert_close(reward(images, prompts), expected, rtol=1e-4, atol=1e-5)
    # padding is masked: the score of "dog" does not depend on what the padding ids are
    assert not torch.allclose(expected[0], expected[2])


def test_preprocessing_is_resize_shorter_side_center_crop_clip_normalisation(reward):
    """A 64 x 32 image: the shorter side is resized to 32 (the tiny image_size), the longer side's
    centre kept; constant images map to (c - mean) / std per channel."""
    from rewards.image_reward import CLIP_MEAN, CLIP_STD

    x = torch.zeros(1, 3, 64, 32)
    x[:, :, 16:48] = 1.0  # a bright band in the centre: exactly what the centre crop keeps
    px = reward.preprocess(x)
    assert px.shape == (1, 3, 32, 32)
    m = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(px[:, :, 4:-4], ((1.0 - m) / s).expand(1, 3, 24, 32), rtol=1e-3, atol=2e-2)
    const = torch.full((2, 3, 50, 50), 0.25)
    torch.testing.assert_close(reward.preprocess(const), ((0.25 - m) / s).expand(2, 3, 32, 32), rtol=1e-4, atol=1e-4)


def test_gradient_wrt_images_is_finite_nonzero_and_matches_finite_differences(files):
    from rewards.image_reward import ImageReward

    r = ImageReward(str(files[0]), str(files[1]), arch=TINY_IMAGE_REWARD_ARCH, dtype="float32").load()
    r.double()
    torch.manual_seed(2)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    prompts = ["a cat", "a blue dog"]
    (g,) = torch.autograd.grad(r(x, prompts).sum(), x)
    assert torch.isfinite(g).all() and g.abs().max() > 0
    assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0
    for flat in g.flatten().abs().topk(3).indices.tolist():
        h = 1e-5
        e = torch.zeros_like(x).flatten()
        e[flat] = h
        e = e.view_as(x)
        with torch.no_grad():
            fd = (r(x + e, prompts).sum() - r(x - e, prompts).sum()) / (2 * h)
        assert float(fd) == pytest.approx(float(g.flatten()[flat]), rel=1e-4)


def test_prompt_changes_the_score_and_prompts_are_required(reward):
    torch.manual_seed(3)
    x = torch.rand(1, 3, 32, 32).expand(4, -1, -1, -1)
    s = reward(x, ["a cat", "a dog", "a red horse on the big green", "a cat"])
    assert s[0] == s[3] and len({round(float(v), 6) for v in s[:3]}) == 3
    with pytest.raises(ValueError, match="needs prompts"):
        reward(x)
    d = reward.describe()
    assert d["name"] == "image_reward" and d["mean"] == 0.16717362830052426 and math.isclose(d["std"], 1.0333394966054072)


def test_float16_autocast_close_to_float32(files, reward):
    """bfloat16 really lowers the encoders' precision yet returns float32 close to float32."""
    from rewards.image_reward import ImageReward

    r16 = ImageReward(str(files[0]), str(files[1]), arch=TINY_IMAGE_REWARD_ARCH, dtype="bfloat16").load()
    torch.manual_seed(4)
    x = torch.rand(2, 3, 32, 32)
    a, b = reward(x, ["a cat", "a dog"]), r16(x, ["a cat", "a dog"])
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert (a - b).abs().max() < 0.1
