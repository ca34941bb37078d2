"""Tests for common.rewards: JPEG, preprocessing, aesthetic, CLIP score, PickScore, combine, HTTP, loader."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from common.rewards import REWARD_NAMES, load_reward
from common.rewards.combine import CombinedReward
from common.rewards.http import HttpReward, decode_png, encode_png, serve_reward
from common.rewards.jpeg import JpegCompressibility, JpegIncompressibility, jpeg_size_kb
from common.rewards.preprocess import ClipPreprocess, clip_preprocess, resize_shortest_side


def _smooth_uint8(height: int = 61, width: int = 83) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([128 + 100 * np.sin(xx / 7), 128 + 100 * np.cos(yy / 5), 128 + 60 * np.sin((xx + yy) / 9)], -1)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _images(b: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# JPEG
# ---------------------------------------------------------------------------------------------------

def test_jpeg_size_matches_pil_quality_95_in_kilobytes():
    images = _images(2)
    arr = (images[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="JPEG", quality=95)
    sizes = jpeg_size_kb(images)
    assert sizes.dtype == torch.float32 and sizes.shape == (2,)
    assert sizes[0].item() == pytest.approx(len(buffer.getvalue()) / 1000)
    # a different quality gives a different size, so the default really is 95
    assert jpeg_size_kb(images, quality=50)[0] < sizes[0]


def test_jpeg_noise_is_incompressible_flat_is_compressible():
    images = torch.cat([torch.full((1, 3, 64, 64), 0.5), _images(1, 64, 64)])
    inc, info = JpegIncompressibility()(images, ["a", "b"])
    comp, _ = JpegCompressibility()(images, ["a", "b"])
    assert inc[1] > 3 * inc[0]
    assert torch.equal(comp, -inc)
    assert torch.equal(info["jpeg_kb"], inc)


def test_jpeg_rejects_bad_inputs():
    with pytest.raises(ValueError, match="prompts has 1 items"):
        JpegCompressibility()(_images(2), ["a"])
    with pytest.raises(ValueError, match="image 1"):
        JpegCompressibility()(torch.cat([_images(1), _images(1) + 2]), ["a", "b"])
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)


# ---------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------

def test_resize_shortest_side_matches_transformers_rule():
    assert resize_shortest_side(224, 512, 768) == (224, 336)
    assert resize_shortest_side(224, 768, 512) == (336, 224)
    assert resize_shortest_side(32, 61, 83) == (32, 43)  # int(32 * 83 / 61) = 43
    assert resize_shortest_side(32, 40, 40) == (32, 32)


@pytest.mark.parametrize("size,crop", [(32, 32), (24, 20), (64, 48)])
def test_preprocess_close_to_clip_image_processor(size, crop):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    arr = _smooth_uint8()
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})
    ref = torch.from_numpy(np.asarray(processor(images=Image.fromarray(arr), return_tensors="np")["pixel_values"]))
    pre = ClipPreprocess.from_image_processor(processor)
    out = pre(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255)
    assert out.shape == ref.shape == (1, 3, crop, crop)
    # compare in [0, 1] pixel units: the processor rounds to uint8 twice, torch stays float
    err = (out - ref) * torch.tensor(pre.std).view(1, 3, 1, 1)
    assert err.abs().max() < 1.5 / 255
    assert err.abs().mean() < 0.5 / 255


def test_preprocess_is_differentiable_and_reads_config(tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 20, "width": 20}).save_pretrained(tmp_path)
    pre = ClipPreprocess.from_pretrained(tmp_path)
    assert (pre.size, pre.crop_size) == (24, (20, 20))
    x = _images(2, 30, 40).requires_grad_(True)
    pre(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # normalisation: a constant image equal to the mean maps to zero
    mean_img = torch.tensor(pre.mean).view(1, 3, 1, 1).expand(1, 3, 24, 24)
    assert clip_preprocess(mean_img, 24, (20, 20)).abs().max() < 1e-6
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        ClipPreprocess.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="crop_size"):
        clip_preprocess(x, 16, (20, 20))


# ---------------------------------------------------------------------------------------------------
# Aesthetic
# ---------------------------------------------------------------------------------------------------

def test_aesthetic_head_matches_official_layout():
    from common.rewards.aesthetic import AestheticHead

    head = AestheticHead()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items() if k.endswith("weight")}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.2.weight": (128, 1024),
                      "layers.4.weight": (64, 128), "layers.6.weight": (16, 64), "layers.7.weight": (1, 16)}
    # no activations: in eval mode the head is affine, f(a + b) - f(b) = f(a) - f(0)
    head.eval()
    a, b, z = torch.randn(1, 768), torch.randn(1, 768), torch.zeros(1, 768)
    torch.testing.assert_close(head(a + b) - head(b), head(a) - head(z), atol=1e-5, rtol=1e-4)


def test_aesthetic_tiny_score_is_head_of_normalised_embedding_and_differentiable():
    from common.rewards.aesthetic import AestheticReward
    from common.rewards.clip import image_features

    reward = AestheticReward(tiny=True)
    x = _images(2, 40, 48).requires_grad_(True)
    scores, _ = reward(x, ["a", "b"])
    feats = image_features(reward.clip, reward.preprocess(x))
    manual = reward.head(feats / feats.norm(dim=-1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(scores, manual)
    scores.sum().backward()
    assert x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


def test_aesthetic_loads_local_safetensors_and_refuses_pickle(tmp_path):
    from safetensors.torch import save_file

    from common.rewards.aesthetic import AestheticReward

    tiny = AestheticReward(tiny=True)
    torch.manual_seed(1)
    for p in tiny.head.parameters():
        p.data.normal_()
    tiny.clip.save_pretrained(tmp_path / "clip")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    save_file(tiny.head.state_dict(), str(tmp_path / "head.safetensors"))
    loaded = AestheticReward(clip_dir=tmp_path / "clip", head_path=tmp_path / "head.safetensors")
    x = _images(2)
    torch.testing.assert_close(loaded(x, ["a", "b"])[0], tiny(x, ["a", "b"])[0])

    torch.save(tiny.head.state_dict(), tmp_path / "head.pth")
    with pytest.raises(ValueError, match="pickle"):
        AestheticReward(clip_dir=tmp_path / "clip", head_path=tmp_path / "head.pth")
    with pytest.raises(ValueError, match="clip_dir"):
        AestheticReward(clip_dir=tmp_path / "nope", head_path=tmp_path / "head.safetensors")
    with pytest.raises(ValueError, match="both required"):
        AestheticReward()


# ---------------------------------------------------------------------------------------------------
# CLIP score and PickScore
# ---------------------------------------------------------------------------------------------------

def test_tiny_tokenizer_ids_agree_with_tiny_config():
    from common.rewards.clip import tiny_clip

    model, tok, _ = tiny_clip()
    ids = tok(["the cat and the dog!"])["input_ids"][0]
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "the</w>", "cat</w>", "and</w>", "the</w>",
                                              "dog</w>", "!</w>", "<|endoftext|>"]
    assert ids[-1] == model.config.text_config.eos_token_id == len(tok) - 1
    assert model.config.text_config.vocab_size == len(tok)


def test_clip_score_equals_clipmodel_cosine_and_scales():
    from common.rewards.clip import ClipScore

    reward = ClipScore(tiny=True)
    x, prompts = _images(3), ["a red cat", "two dogs", "a blue square on the left"]
    scores, info = reward(x, prompts)
    # reference: CLIPModel's own logits / exp(logit_scale) on the same pixels and tokens
    tokens = reward.tokenizer(prompts, padding=True, return_tensors="pt")
    out = reward.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=reward.preprocess(x))
    expected = out.logits_per_image.diagonal() / reward.model.logit_scale.exp()
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(info["cosine"], scores)
    scaled, _ = ClipScore(tiny=True, scale=2.5, clamp_at_zero=True)(x, prompts)
    torch.testing.assert_close(scaled, 2.5 * scores.clamp(min=0))


def test_clip_rewards_are_differentiable_wrt_images():
    from common.rewards.clip import ClipScore, PickScore

    for reward in (ClipScore(tiny=True), PickScore(tiny=True)):
        x = _images(2, 40, 36).requires_grad_(True)
        reward(x, ["a cat", "a dog"])[0].sum().backward()
        assert x.grad.abs().sum() > 0, reward.name
        assert not any(p.requires_grad for p in reward.parameters())


def test_pickscore_is_logit_scale_times_cosine_and_probs_softmax():
    from common.rewards.clip import ClipScore, PickScore

    pick, clip = PickScore(tiny=True), ClipScore(tiny=True)  # same seed -> same tiny weights
    x = _images(4)
    scores, _ = pick(x, ["a cat"] * 4)
    cos, _ = clip(x, ["a cat"] * 4)
    torch.testing.assert_close(scores, pick.model.logit_scale.exp() * cos)
    probs = pick.probs("a cat", x)
    torch.testing.assert_close(probs, torch.softmax(scores, 0))
    assert probs.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one prompt"):
        pick.probs(["a cat"], x)


def test_pickscore_loads_from_local_dirs(tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from common.rewards.clip import PickScore

    tiny = PickScore(tiny=True)
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "processor")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "processor")
    loaded = PickScore(tmp_path / "model", processor_dir=tmp_path / "processor")
    x, prompts = _images(2), ["a cat on the left", "two dogs"]
    torch.testing.assert_close(loaded(x, prompts)[0], tiny(x, prompts)[0])
    with pytest.raises(ValueError, match="preprocessor_config"):
        PickScore(tmp_path / "model")  # no processor files next to the weights
    (tmp_path / "model" / "preprocessor_config.json").write_text(
        (tmp_path / "processor" / "preprocessor_config.json").read_text())
    with pytest.raises(ValueError, match="no tokenizer files"):
        PickScore(tmp_path / "model")
    with pytest.raises(ValueError, match="model_dir is required"):
        PickScore()


def test_clip_model_loader_refuses_pickled_weights(tmp_path):
    from common.rewards.clip import ClipScore

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        ClipScore(tmp_path)


# ---------------------------------------------------------------------------------------------------
# CombinedReward
# ---------------------------------------------------------------------------------------------------

class _Const:
    def __init__(self, values):
        self.values = torch.tensor(values)

    def __call__(self, images, prompts, metadata=None):
        return self.values.clone(), {"raw": self.values * 10}


def test_combined_is_weighted_sum_with_component_info():
    combined = CombinedReward({"a": (_Const([1.0, 2.0]), 0.5), "b": (_Const([3.0, -1.0]), 2.0)})
    total, info = combined(_images(2), ["x", "y"])
    torch.testing.assert_close(total, torch.tensor([0.5 + 6.0, 1.0 - 2.0]))
    torch.testing.assert_close(info["a"], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(info["b/raw"], torch.tensor([30.0, -10.0]))


def test_combined_errors():
    with pytest.raises(ValueError, match="empty"):
        CombinedReward({})
    with pytest.raises(ValueError, match="weight"):
        CombinedReward({"a": (_Const([1.0]), float("nan"))})
    with pytest.raises(ValueError, match="combined\\[b\\]: score of sample 1"):
        CombinedReward({"a": (_Const([1.0, 2.0]), 1.0), "b": (_Const([1.0, math.nan]), 1.0)})(
            _images(2), ["x", "y"])


# ---------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def server_for():
    servers = []

    def start(reward):
        server = serve_reward(reward, "127.0.0.1", 0)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_png_round_trip_is_uint8_rounding():
    x = _images(1)[0]
    torch.testing.assert_close(decode_png(encode_png(x)), (x * 255).round() / 255)


def test_http_reward_matches_local_reward(server_for):
    server = server_for(JpegIncompressibility())
    x, prompts, meta = _images(5, 24, 24), list("abcde"), [{"i": i} for i in range(5)]
    remote, info = HttpReward(server.url, timeout=10, batch_size=2)(x, prompts, meta)
    local, _ = JpegIncompressibility()(x, prompts, meta)
    torch.testing.assert_close(remote, local)
    torch.testing.assert_close(info["jpeg_kb"], local)


def test_http_reward_passes_prompts_and_metadata(server_for):
    seen = {}

    def spy(images, prompts, metadata=None):
        seen.update(prompts=prompts, metadata=metadata, shape=tuple(images.shape))
        return torch.arange(len(prompts), dtype=torch.float32), {}

    server = server_for(spy)
    scores, _ = HttpReward(server.url, timeout=10)(_images(2, 8, 12), ["p", "q"], [{"k": 1}, {"k": 2}])
    assert seen == {"prompts": ["p", "q"], "metadata": [{"k": 1}, {"k": 2}], "shape": (2, 3, 8, 12)}
    assert scores.tolist() == [0.0, 1.0]


def test_http_reward_errors(server_for):
    def wrong_length(images, prompts, metadata=None):
        return torch.zeros(len(prompts) + 1), {}

    def nan_scores(images, prompts, metadata=None):
        return torch.tensor([0.0, math.nan]), {}

    def raises(images, prompts, metadata=None):
        raise ValueError("prompt 0 is empty")

    x, prompts = _images(2, 8, 8), ["a", "b"]
    with pytest.raises(ValueError, match="returned 3 scores for 2 images"):
        HttpReward(server_for(wrong_length).url, timeout=10)(x, prompts)
    with pytest.raises(ValueError, match="score of sample 1 is nan"):
        HttpReward(server_for(nan_scores).url, timeout=10)(x, prompts)
    with pytest.raises(ValueError, match="400: prompt 0 is empty"):
        HttpReward(server_for(raises).url, timeout=10)(x, prompts)
    with pytest.raises(ValueError, match="JSON"):
        HttpReward(server_for(JpegCompressibility()).url, timeout=10)(x, prompts, [{"f": object()}, {}])
    # a port nobody listens on: bind, read the port, close
    free = serve_reward(JpegCompressibility(), "127.0.0.1", 0)
    url = free.url
    free.server_close()
    with pytest.raises(ConnectionError, match="cannot reach"):
        HttpReward(url, timeout=2)(x, prompts)
    with pytest.raises(ValueError, match="url"):
        HttpReward("localhost:8000")


def test_http_server_handles_concurrent_clients(server_for):
    server = server_for(JpegIncompressibility())
    x = _images(2, 16, 16)
    expected, _ = JpegIncompressibility()(x, ["a", "b"])
    results, errors = [], []

    def call():
        try:
            results.append(HttpReward(server.url, timeout=10)(x, ["a", "b"])[0])
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    for r in results:
        torch.testing.assert_close(r, expected)


# ---------------------------------------------------------------------------------------------------
# load_reward
# ---------------------------------------------------------------------------------------------------

def test_load_reward_names_and_unknown_name():
    assert isinstance(load_reward("jpeg_compressibility"), JpegCompressibility)
    assert type(load_reward("jpeg_incompressibility")) is JpegIncompressibility
    assert isinstance(load_reward("http", url="http://127.0.0.1:1/"), HttpReward)
    assert load_reward("clip_score", tiny=True).name == "clip_score"
    assert load_reward("pickscore", tiny=True).name == "pickscore"
    assert load_reward("aesthetic", tiny=True).name == "aesthetic"
    with pytest.raises(ValueError, match="known rewards: jpeg_compressibility, .*toy_geneval, toy_soft, http"):
        load_reward("hpsv9")
    assert len(set(REWARD_NAMES)) == len(REWARD_NAMES) == 8


def test_load_reward_toy_names():
    toy = pytest.importorskip("common.rewards.toy")
    assert isinstance(load_reward("toy_geneval"), toy.ToyGenEvalReward)
    assert isinstance(load_reward("toy_soft"), toy.ToySoftReward)


def test_import_common_rewards_is_light():
    code = "import sys, common.rewards; print('transformers' in sys.modules, 'common.rewards.clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
