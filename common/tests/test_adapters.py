"""Every adapter on its tiny real pipeline: encoding, CFG, schedule, decoding, LoRA, loading.

The strongest check is `test_ode_sampling_matches_the_diffusers_pipeline`: sampling through the adapter
with the deterministic step gives the diffusers pipeline's own latents and images, so prompt encoding,
conditioning, CFG, packing and the schedule all agree with the reference implementation.
"""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from common.models.flux import FluxAdapter, pack_latents, unpack_latents
from common.models.load import load_adapter, require_model
from common.models.sd import SDAdapter
from common.models.sd3 import SD3Adapter
from common.models.tiny import MAX_TOKENS, save_pipeline_dir, tiny_flux, tiny_sd, tiny_sd3, tiny_sdxl
from common.models.toy import build_toy_adapter
from common.steps import ode_step

FAMILIES = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(params=list(FAMILIES))
def adapter(request):
    return FAMILIES[request.param]()


def _inputs(adapter, batch=2, step=1, num_steps=4):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *adapter.latent_shape, generator=gen)
    t = adapter.schedule(num_steps).timesteps[step]
    return x, t, adapter.encode_prompts(PROMPTS[:batch])


def _pipeline(adapter):
    """The diffusers pipeline assembled from the adapter's own components."""
    components = dict(adapter.pipeline_components())
    if adapter.pipeline_class_name == "StableDiffusionPipeline":
        components["requires_safety_checker"] = False
    pipe = getattr(diffusers, adapter.pipeline_class_name)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora_b(adapter):
    return [p for n, p in adapter.denoiser.named_parameters() if "lora_B" in n]


# ---- prompts in, images out --------------------------------------------------------------------
def test_prompts_to_images(adapter):
    x, t, cond = _inputs(adapter)
    assert len(cond) == 2 and cond.hidden.ndim == 3
    out = adapter.predict(x, t, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    images = adapter.decode(x)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert images.std() > 0


def test_decode_is_differentiable(adapter):
    x = torch.randn(1, *adapter.latent_shape, requires_grad=True)
    adapter.decode(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_encode_is_the_inverse_of_decode(adapter):
    """decode(encode(images)) is the VAE's reconstruction of the posterior mean: encode undoes exactly
    the scaling (and shift, or per-channel statistics) that decode applies."""
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x0 = adapter.encode(images)
    assert x0.shape == (2, *adapter.latent_shape) and not x0.requires_grad
    z = adapter.vae.encode(images * 2 - 1).latent_dist.mean
    direct = (adapter.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(adapter.decode(x0), direct, atol=1e-5, rtol=1e-5)
    a, b = (adapter.encode(images, torch.Generator().manual_seed(1), sample=True) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, x0)  # a seeded draw from the posterior


def test_encode_in_pixel_space_is_2x_minus_1():
    adapter = build_toy_adapter("unet")
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(adapter.encode(images), images * 2 - 1)
    torch.testing.assert_close(adapter.decode(adapter.encode(images)), images)


# ---- the reference: diffusers' own pipeline ------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_ode_sampling_matches_the_diffusers_pipeline(family):
    adapter = FAMILIES[family]()
    num_steps, batch = 3, 2
    # FLUX-dev has no true CFG by default (its guidance is the distilled embedding); the others use CFG 4.5
    scale = 1.0 if family == "flux" else 4.5
    x = torch.randn(batch, *adapter.latent_shape, generator=torch.Generator().manual_seed(1))
    noise = x.clone()
    schedule = adapter.schedule(num_steps)
    cond = adapter.encode_prompts(PROMPTS)
    uncond = adapter.encode_prompts([""]) if scale != 1 else None
    for i in range(num_steps):
        x = ode_step(adapter.predict(x, schedule.timesteps[i], cond, uncond, scale), x, schedule, i).prev_sample

    pipe = _pipeline(adapter)
    size = adapter.latent_shape[1] * adapter.vae_scale_factor
    kwargs = {"num_inference_steps": num_steps, "height": size, "width": size}
    if family == "flux":
        kwargs |= {"guidance_scale": adapter.guidance, "max_sequence_length": MAX_TOKENS}
        latents = pack_latents(noise)
    else:
        kwargs |= {"guidance_scale": scale, "negative_prompt": [""] * batch}
        latents = noise
    if family == "sd3":
        kwargs["max_sequence_length"] = MAX_TOKENS
    if family == "sd":
        kwargs["eta"] = 0.0
    out = pipe(prompt=PROMPTS, latents=latents.clone(), output_type="latent", **kwargs).images
    if family == "flux":
        out = unpack_latents(out, *adapter.latent_shape[1:])
    torch.testing.assert_close(x, out, rtol=1e-5, atol=1e-5)
    images = pipe(prompt=PROMPTS, latents=latents.clone(), output_type="pt", **kwargs).images
    torch.testing.assert_close(adapter.decode(x), images, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_schedule_matches_the_pipeline_scheduler(family):
    adapter = FAMILIES[family]()
    pipe = _pipeline(adapter)
    size = adapter.latent_shape[1] * adapter.vae_scale_factor
    extra = {"max_sequence_length": MAX_TOKENS} if family in ("sd3", "flux") else {}
    pipe(prompt="a", num_inference_steps=5, height=size, width=size, output_type="latent", **extra)
    schedule = adapter.schedule(5)
    assert torch.equal(schedule.timesteps, pipe.scheduler.timesteps)
    if adapter.prediction == "flow":
        assert torch.equal(schedule.sigmas, pipe.scheduler.sigmas)
        assert schedule.sigmas.shape == (6,) and schedule.sigmas[0] == 1 and schedule.sigmas[-1] == 0
    else:
        assert torch.equal(schedule.prev_timesteps, schedule.timesteps - 1000 // 5)
        assert torch.equal(schedule.alphas_cumprod, pipe.scheduler.alphas_cumprod)
        assert schedule.alphas_cumprod.dtype == torch.float32
        assert schedule.final_alpha_cumprod == pytest.approx(float(pipe.scheduler.alphas_cumprod[0]))


def test_flux_schedule_shift_depends_on_resolution():
    small = tiny_flux()
    large = FluxAdapter.from_pipeline_components(small.pipeline_components(), resolution=64)
    assert large.latent_shape == (4, 32, 32)
    # more image tokens -> larger mu -> the grid stays longer at high noise
    assert (large.schedule(4).sigmas[1:4] > small.schedule(4).sigmas[1:4]).all()


# ---- classifier-free guidance -----------------------------------------------------------------
def test_cfg_is_one_batched_forward_equal_to_two_forwards(adapter):
    x, t, cond = _inputs(adapter)
    uncond = adapter.encode_prompts(["", ""])
    calls = []
    handle = adapter.denoiser.register_forward_hook(lambda m, a, k: calls.append(1))
    guided = adapter.predict(x, t, cond, uncond, guidance_scale=4.5)
    handle.remove()
    assert len(calls) == 1
    c, u = adapter.predict(x, t, cond), adapter.predict(x, t, uncond)
    torch.testing.assert_close(guided, u + 4.5 * (c - u), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(guided, c, atol=1e-4)
    # one unconditional row serves the whole batch; scale 1 ignores it
    torch.testing.assert_close(adapter.predict(x, t, cond, adapter.encode_prompts([""]), 4.5), guided)
    assert torch.equal(adapter.predict(x, t, cond, uncond, 1.0), adapter.predict(x, t, cond))


def test_per_sample_timesteps(adapter):
    x, _, cond = _inputs(adapter)
    ts = adapter.schedule(4).timesteps
    both = adapter.predict(x, ts[[0, 2]], cond)
    torch.testing.assert_close(both[1:], adapter.predict(x[1:], ts[2], cond.index(slice(1, 2))),
                               rtol=1e-5, atol=1e-5)


def test_bad_batch_is_rejected(adapter):
    x, t, cond = _inputs(adapter)
    with pytest.raises(ValueError, match="cond"):
        adapter.predict(x[:1], t, cond)


# ---- training -----------------------------------------------------------------------------------
def test_lora_gradients_reach_only_lora(adapter):
    x, t, cond = _inputs(adapter)
    adapter.add_lora(rank=2)
    trainable = adapter.trainable_parameters()
    names = {n for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in names)
    adapter.predict(x, t, cond, adapter.encode_prompts([""]), 3.0).square().mean().backward()
    reached = {n: p.grad is not None and p.grad.abs().sum() > 0
               for n, p in adapter.denoiser.named_parameters() if "lora_B" in n}
    # SD3's last block discards its text stream (context_pre_only), so that block's text query is unused
    unused = {n for n in reached if n.startswith(f"transformer_blocks.{len(getattr(adapter.denoiser, 'transformer_blocks', [])) - 1}.attn.add_q_proj")}
    assert len(reached) > 4 and all(ok for n, ok in reached.items() if n not in unused)
    assert all(p.grad is None for p in adapter.denoiser.parameters() if not p.requires_grad)


def test_disable_adapter_gives_the_base_output(adapter):
    x, t, cond = _inputs(adapter)
    base = adapter.predict(x, t, cond)
    adapter.add_lora(rank=2)
    with torch.no_grad():
        for p in _lora_b(adapter):
            p.normal_(std=0.5)
    tuned = adapter.predict(x, t, cond)
    assert not torch.allclose(tuned, base, atol=1e-4)
    with adapter.disable_adapter():
        assert torch.equal(adapter.predict(x, t, cond), base)
    assert torch.equal(adapter.predict(x, t, cond), tuned)


def test_gradient_checkpointing_keeps_gradients(adapter):
    x, t, cond = _inputs(adapter)
    adapter.add_lora(rank=2)
    adapter.predict(x, t, cond).square().mean().backward()
    plain = [p.grad.clone() for p in _lora_b(adapter)]
    adapter.denoiser.zero_grad(set_to_none=True)
    adapter.enable_gradient_checkpointing()
    assert adapter.denoiser.is_gradient_checkpointing
    adapter.predict(x, t, cond).square().mean().backward()
    for before, p in zip(plain, _lora_b(adapter)):
        torch.testing.assert_close(p.grad, before)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16(family):
    adapter = load_adapter(f"tiny-{family}", dtype=torch.bfloat16)
    assert adapter.dtype == torch.bfloat16
    x, t, cond = _inputs(adapter)
    out = adapter.predict(x, t, cond, adapter.encode_prompts([""]), 2.0)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    fp32 = FAMILIES[family]()
    reference = fp32.predict(x, t, cond, fp32.encode_prompts([""]), 2.0)
    assert (out.float() - reference).abs().mean() < 0.05 * reference.abs().mean()
    images = adapter.decode(x)
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1


# ---- loading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_and_load_round_trip(family, tmp_path):
    adapter = FAMILIES[family]()
    save_pipeline_dir(adapter, tmp_path / family)
    index = json.loads((tmp_path / family / "model_index.json").read_text())
    assert index["_class_name"] == adapter.pipeline_class_name
    loaded = load_adapter(tmp_path / family)
    assert type(loaded) is type(adapter) and loaded.latent_shape == adapter.latent_shape
    x, t, cond = _inputs(adapter)
    assert torch.equal(loaded.encode_prompts(PROMPTS).hidden, cond.hidden)
    assert torch.equal(loaded.predict(x, t, loaded.encode_prompts(PROMPTS)), adapter.predict(x, t, cond))
    assert torch.equal(loaded.schedule(4).timesteps, adapter.schedule(4).timesteps)
    assert torch.equal(loaded.decode(x), adapter.decode(x))
    # diffusers itself reads the directory too
    assert type(diffusers.DiffusionPipeline.from_pretrained(tmp_path / family)).__name__ == index["_class_name"]


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a diffusers pipeline directory: no model_index.json"):
        load_adapter(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="KandinskyPipeline"):
        load_adapter(tmp_path)


def test_require_model_names_the_field(tmp_path):
    require_model("toy-flow")
    (tmp_path / "model_index.json").write_text("{}")
    require_model(str(tmp_path))  # a pipeline directory passes; its contents are load_adapter's business
    with pytest.raises(ValueError, match=r"^model: '/no/such' is neither a built-in name"):
        require_model("/no/such")
    with pytest.raises(ValueError, match="^reward_model: "):
        require_model("nope", field="reward_model")


# ---- toy-style setups: pixel space, word-level tokenizer, one text encoder ----------------------
def _word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<unk>", "<eos>", "a", "red", "blue", "circle"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                        special_tokens=[("<bos>", 1), ("<eos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=6, pad_token="<pad>",
                                   bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def _clip_with_projection() -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=6, projection_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=3))


def test_sd_pixel_space_with_a_word_tokenizer():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(8, 16), cross_attention_dim=16, attention_head_dim=2,
                                norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    adapter = SDAdapter(unet, _clip_with_projection(), _word_tokenizer(), DDIMScheduler())
    assert adapter.latent_shape == (3, 8, 8)
    cond = adapter.encode_prompts(["a red circle", "blue"])
    assert cond.hidden.shape == (2, 6, 16)
    assert not torch.equal(cond.hidden[0], cond.hidden[1])
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert adapter.predict(x, 500, cond).shape == x.shape
    torch.testing.assert_close(adapter.decode(x), (x + 1) / 2)
    assert adapter.decode(torch.full((1, 3, 8, 8), 3.0)).max() == 1


def test_sd3_one_encoder_without_t5_in_pixel_space():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=3, out_channels=3, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=4)
    adapter = SD3Adapter(transformer, [_clip_with_projection()], [_word_tokenizer()],
                         FlowMatchEulerDiscreteScheduler(shift=3.0), t5_max_length=0)
    assert adapter.latent_shape == (3, 8, 8)
    cond = adapter.encode_prompts(["a red circle", "blue"])
    assert cond.hidden.shape == (2, 6, 16) and cond.pooled.shape == (2, 16)
    x = torch.randn(2, 3, 8, 8)
    assert adapter.predict(x, adapter.schedule(3).timesteps[0], cond).shape == x.shape
    torch.testing.assert_close(adapter.decode(x), ((x + 1) / 2).clamp(0, 1))
    # the pipeline's behaviour without T5: zero tokens appended (256 by default)
    padded = SD3Adapter(transformer, [_clip_with_projection()], [_word_tokenizer()],
                        FlowMatchEulerDiscreteScheduler(shift=3.0))
    hidden = padded.encode_prompts(["a"]).hidden
    assert hidden.shape == (1, 6 + 256, 16) and hidden[:, 6:].abs().sum() == 0


# ---- constructor checks -------------------------------------------------------------------------
def test_constructor_errors():
    sd = tiny_sd()
    v_pred = DDIMScheduler(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="prediction_type"):
        SDAdapter(sd.unet, sd.text_encoder, sd.tokenizer, v_pred)
    with pytest.raises(ValueError, match="tokenizer_2"):
        SDAdapter(sd.unet, sd.text_encoder, sd.tokenizer, sd.scheduler, text_encoder_2=sd.text_encoder)
    sd3 = tiny_sd3()
    with pytest.raises(ValueError, match="tokenizers"):
        SD3Adapter(sd3.transformer, sd3.text_encoders, sd3.tokenizers[:1], sd3.scheduler)
    flux = tiny_flux()
    assert flux.guidance == 3.5
    parts = flux.pipeline_components()
    with pytest.raises(ValueError, match="vae"):
        FluxAdapter(parts["transformer"], parts["text_encoder"], parts["tokenizer"], parts["text_encoder_2"],
                    parts["tokenizer_2"], parts["scheduler"], None)


def test_flux_pack_unpack_round_trip():
    x = torch.randn(2, 4, 8, 6)
    packed = pack_latents(x)
    assert packed.shape == (2, 12, 16)
    # one token = one 2x2 patch, channels outermost
    assert torch.equal(packed[0, 1], x[0, :, 0:2, 2:4].reshape(-1))
    assert torch.equal(unpack_latents(packed, 8, 6), x)


def test_tiny_models_are_tiny_and_seeded():
    for build in FAMILIES.values():
        a, b = build(), build()
        n = sum(p.numel() for p in a.denoiser.parameters())
        assert 1_000 < n < 100_000
        assert all(torch.equal(p, q) for p, q in zip(a.denoiser.parameters(), b.denoiser.parameters()))
    assert not torch.equal(next(tiny_sd(1).denoiser.parameters()), next(tiny_sd(0).denoiser.parameters()))
