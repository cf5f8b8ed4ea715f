"""The FLUX.2 VAE: both file layouts, exact agreement with diffusers' Flux2Pipeline, real key names,
and helpful refusals of files that are not a FLUX.2 VAE."""

from __future__ import annotations

import json
import types

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2, Flux2Pipeline
from safetensors.torch import load_file, save_file

from flux2kit.pipelines.models import vae as vae_mod
from flux2kit.pipelines.errors import Flux2KitError, UnsupportedFormatError
from flux2kit.pipelines.demo_models.vae import build_tiny_vae, save_vae_diffusers, save_vae_ldm, tiny_vae_config
from flux2kit.pipelines.files.vae_checkpoint import convert_diffusers_vae_to_ldm, convert_ldm_vae_to_diffusers, vae_config_from_ldm
from flux2kit.pipelines.models.vae import Flux2VAE, load_vae, patchify_latents, unpatchify_latents

# --------------------------------------------------------------------------------------------
# Real key names of flux2-vae.safetensors / BFL's ae.safetensors.
# Verified in public source:
# - black-forest-labs/flux2 src/flux2/autoencoder.py: Encoder owns `quant_conv` (Conv2d(2z, 2z, 1)),
#   Decoder owns `post_quant_conv` (Conv2d(z, z, 1)); levels `down.i.block.j` / `up.i.block.j` with
#   `nin_shortcut` where the width changes; `mid.block_1`, `mid.attn_1` (norm, q, k, v, proj_out as
#   1x1 Conv2d), `mid.block_2`; `norm_out`, `conv_out`; AutoEncoder.bn = BatchNorm2d(4 * z) with
#   running stats. AutoEncoderParams: ch 128, ch_mult [1, 2, 4, 4], num_res_blocks 2, z_channels 32.
#   src/flux2/util.py load_ae() loads the file with load_state_dict(strict=True), so the file holds
#   exactly the module's state-dict keys (bn.num_batches_tracked included).
# - huggingface/diffusers scripts/convert_flux2_to_diffusers.py DIFFUSERS_VAE_TO_FLUX2_MAPPING:
#   "quant_conv.weight" <- "encoder.quant_conv.weight", "post_quant_conv.weight" <-
#   "decoder.post_quant_conv.weight", "bn.running_mean"/"bn.running_var" unchanged, attention
#   q/k/v/proj_out -> to_q/to_k/to_v/to_out.0 with the 1x1 conv weight squeezed to (C, C).
# - ComfyUI comfy/sd.py VAE.__init__: `if "decoder.post_quant_conv.weight" in sd` renames the nested
#   quant convs; `if "bn.running_mean" in sd` turns on batch_norm_latent (FLUX.2).
REAL_VAE_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (64, 512, 3, 3),
    "encoder.quant_conv.weight": (64, 64, 1, 1),
    "decoder.post_quant_conv.weight": (32, 32, 1, 1),
    "decoder.conv_in.weight": (512, 32, 3, 3),
    "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "bn.running_mean": (128,),
    "bn.running_var": (128,),
    "bn.num_batches_tracked": (),
}
REAL_VAE_ABSENT = ["decoder.up.0.upsample.conv.weight", "encoder.down.3.downsample.conv.weight", "quant_conv.weight"]


def bfl_autoencoder_shapes(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z=32) -> dict[str, tuple]:
    """Every state-dict entry of BFL's flux2 AutoEncoder, derived from its module structure."""
    s: dict[str, tuple] = {}

    def conv(name, cout, cin, k):
        s[f"{name}.weight"], s[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{p}", c, c, 1)
        resnet(f"{prefix}.mid.block_2", c, c)

    levels = len(ch_mult)
    conv("encoder.conv_in", ch, 3, 3)
    block_in = ch
    for i, mult in enumerate(ch_mult):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, ch * mult)
            block_in = ch * mult
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", 2 * z, block_in, 3)
    conv("encoder.quant_conv", 2 * z, 2 * z, 1)

    conv("decoder.post_quant_conv", z, z, 1)
    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", block_in, z, 3)
    mid("decoder", block_in)
    for i in reversed(range(levels)):
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", 3, block_in, 3)

    s["bn.running_mean"], s["bn.running_var"], s["bn.num_batches_tracked"] = (4 * z,), (4 * z,), ()
    return s


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_vae(seed=0)


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    paths = {
        "ldm": save_vae_ldm(tiny, str(d / "flux2-vae.safetensors")),
        "ldm_vae_prefix": save_vae_ldm(tiny, str(d / "prefixed_vae.safetensors"), prefix="vae."),
        "ldm_fsm_prefix": save_vae_ldm(tiny, str(d / "prefixed_fsm.safetensors"), prefix="first_stage_model."),
        "diffusers_vae": save_vae_diffusers(tiny, str(d / "pipe" / "vae")),
    }
    paths["diffusers_root"] = str(d / "pipe")
    return paths


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 32, 48, generator=g) * 2 - 1


def diffusers_encode(vae: AutoencoderKLFlux2, images: torch.Tensor) -> torch.Tensor:
    """diffusers' own Flux2Pipeline._encode_vae_image, run on a bare VAE."""
    pipe = types.SimpleNamespace(vae=vae, _patchify_latents=Flux2Pipeline._patchify_latents)
    with torch.no_grad():
        return Flux2Pipeline._encode_vae_image(pipe, image=images, generator=None)


def diffusers_decode(vae: AutoencoderKLFlux2, latents: torch.Tensor) -> torch.Tensor:
    """The decode at the end of Flux2Pipeline.__call__ (after _unpack_latents_with_ids), line for line."""
    with torch.no_grad():
        latents_bn_mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        latents_bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
            latents.device, latents.dtype
        )
        latents = latents * latents_bn_std + latents_bn_mean
        latents = Flux2Pipeline._unpatchify_latents(latents)
        return vae.decode(latents, return_dict=False)[0]


# --------------------------------------------------------------------------------------------
# Latent layout


def test_patchify_matches_diffusers_and_inverts():
    x = torch.randn(2, 32, 6, 10)
    p = patchify_latents(x)
    assert p.shape == (2, 128, 3, 5)
    assert torch.equal(p, Flux2Pipeline._patchify_latents(x))
    assert torch.equal(unpatchify_latents(p), x)
    y = torch.randn(1, 128, 4, 3)
    assert torch.equal(unpatchify_latents(y), Flux2Pipeline._unpatchify_latents(y))
    # channel order (c, dy, dx): channel 4c + 2*dy + dx holds pixel (2i + dy, 2j + dx) of channel c
    assert p[0, 4 * 5 + 2 * 1 + 0, 2, 3] == x[0, 5, 2 * 2 + 1, 2 * 3 + 0]


# --------------------------------------------------------------------------------------------
# Loading both layouts; agreement with diffusers


@pytest.mark.parametrize("layout", ["ldm", "ldm_vae_prefix", "ldm_fsm_prefix", "diffusers_vae", "diffusers_root"])
def test_every_layout_matches_diffusers_exactly(tiny, files, images, layout):
    vae = load_vae(files[layout])
    assert isinstance(vae, Flux2VAE)
    assert vae.device == torch.device("cpu") and vae.dtype == torch.float32
    assert not vae.model.training
    state = vae.model.state_dict()
    assert not any(t.is_meta for t in state.values())
    assert all(t.dtype == torch.float32 for k, t in state.items() if k != "bn.num_batches_tracked")
    assert tuple(vae.model.config.block_out_channels) == tuple(tiny_vae_config()["block_out_channels"])
    assert vae.model.config.layers_per_block == 1 and vae.model.config.latent_channels == 32

    latents = vae.encode(images)
    assert latents.shape == (2, 128, 2, 3)
    assert torch.equal(latents, diffusers_encode(tiny, images))

    decoded = vae.decode(latents)
    assert decoded.shape == (2, 3, 32, 48)
    assert torch.equal(decoded, diffusers_decode(tiny, latents))


def test_encode_is_mode_patchify_batchnorm(tiny, files, images):
    """Spelled out: argmax (mean) of the posterior, 2x2 patchify, (x - mean) / sqrt(var + eps)."""
    vae = load_vae(files["ldm"])
    with torch.no_grad():
        moments = tiny.quant_conv(tiny.encoder(images))
        mean = moments.chunk(2, dim=1)[0]
        z = Flux2Pipeline._patchify_latents(mean)
        bn = tiny.bn
        expected = (z - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4)
    torch.testing.assert_close(vae.encode(images), expected, rtol=0, atol=1e-6)
    # eval BatchNorm computes the same normalisation
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(images), tiny.bn(z), rtol=1e-5, atol=1e-5)
    # the encode is deterministic (no sampling)
    assert torch.equal(vae.encode(images), vae.encode(images))


def test_decode_output_is_not_clamped(files):
    vae = load_vae(files["ldm"])
    big = torch.full((1, 128, 2, 2), 40.0)
    out = vae.decode(big)
    assert out.shape == (1, 3, 32, 32)
    # a random VAE fed extreme latents leaves [-1, 1]; decode must hand that back untouched
    assert out.abs().max() > 1.0


def test_bf16_load_matches_diffusers_in_bf16(tiny, files, images):
    vae = load_vae(files["ldm"], dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    assert vae.model.encoder.conv_in.weight.dtype == torch.bfloat16
    assert vae.model.bn.num_batches_tracked.dtype == torch.int64
    reference = build_tiny_vae(seed=0).to(torch.bfloat16)
    x = images[:1, :, :, :32].to(torch.bfloat16)  # bf16 convolutions are slow on CPU
    latents = vae.encode(x)
    assert latents.dtype == torch.bfloat16
    assert torch.equal(latents, diffusers_encode(reference, x))
    assert torch.equal(vae.decode(latents), diffusers_decode(reference, latents))


def test_bf16_file_loads_to_fp32(tiny, tmp_path, images):
    path = save_vae_ldm(tiny, str(tmp_path / "vae_bf16.safetensors"), dtype=torch.bfloat16)
    header_dtypes = {t.dtype for t in load_file(path).values()}
    assert header_dtypes == {torch.bfloat16, torch.int64}
    vae = load_vae(path)
    assert vae.model.encoder.conv_in.weight.dtype == torch.float32
    rounded = {
        k: v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else v for k, v in tiny.state_dict().items()
    }
    for k, v in vae.model.state_dict().items():
        assert torch.equal(v, rounded[k]), k


def test_to_moves_model(files):
    vae = load_vae(files["ldm"], device=torch.device("cpu"))
    assert vae.to("cpu") is vae
    assert vae.device == torch.device("cpu")
    assert vae.scale_factor == 16


def test_streams_one_tensor_at_a_time(files, monkeypatch):
    """Each tensor is read once via TensorFile.get; the model is never materialised twice."""
    from flux2kit.pipelines.files import safetensors as safetensors_io

    calls = []
    original = safetensors_io.TensorFile.get

    def counting_get(self, key):
        calls.append(key)
        return original(self, key)

    monkeypatch.setattr(safetensors_io.TensorFile, "get", counting_get)
    built = []
    original_build = vae_mod.build_on_meta

    def recording_build(config):
        model = original_build(config)
        built.append(all(p.is_meta for p in model.parameters()))
        return model

    monkeypatch.setattr(vae_mod, "build_on_meta", recording_build)
    load_vae(files["ldm"])
    assert built == [True]
    assert len(calls) == len(set(calls)) == len(load_file(files["ldm"]))


def test_built_on_meta_device():
    config = vae_config_from_ldm(bfl_autoencoder_shapes())
    model = vae_mod.build_on_meta(config)
    assert all(p.is_meta for p in model.parameters())


def test_missing_num_batches_tracked_and_comfy_top_level_quant_convs(tiny, files, tmp_path, images):
    """ComfyUI's VAE Save writes quant_conv/post_quant_conv at top level; some exports drop num_batches_tracked."""
    sd = load_file(files["ldm"])
    sd.pop("bn.num_batches_tracked")
    for name in list(sd):
        if name.startswith(("encoder.quant_conv.", "decoder.post_quant_conv.")):
            sd[name.split(".", 1)[1]] = sd.pop(name)
    path = str(tmp_path / "comfy_saved.safetensors")
    save_file(sd, path)
    vae = load_vae(path)
    assert vae.model.bn.num_batches_tracked.item() == 0
    assert torch.equal(vae.encode(images), diffusers_encode(tiny, images))


def test_all_in_one_checkpoint_with_prefix(tiny, files, tmp_path, images):
    sd = {f"first_stage_model.{k}": v for k, v in load_file(files["ldm"]).items()}
    sd["model.diffusion_model.img_in.weight"] = torch.zeros(4, 4)
    path = str(tmp_path / "all_in_one.safetensors")
    save_file(sd, path)
    assert torch.equal(load_vae(path).encode(images), diffusers_encode(tiny, images))


def test_diffusers_keys_in_a_single_file(tiny, tmp_path, images):
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, path)
    vae = load_vae(path)
    assert torch.equal(vae.encode(images), diffusers_encode(tiny, images))


# --------------------------------------------------------------------------------------------
# Conversion


@pytest.mark.parametrize(
    "config",
    [
        tiny_vae_config(),
        {**tiny_vae_config(), "layers_per_block": 2, "decoder_block_out_channels": [32, 32, 64, 96]},
    ],
    ids=["tiny", "wider-decoder"],
)
def test_conversion_round_trip_is_exact_and_total(config):
    model = build_tiny_vae(seed=3, config=config)
    sd = model.state_dict()
    ldm = convert_diffusers_vae_to_ldm(sd)
    assert len(ldm) == len(sd)
    assert not any("_blocks" in k or "to_q" in k for k in ldm)
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    back = convert_ldm_vae_to_diffusers(ldm)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # prefixes are stripped
    prefixed = convert_ldm_vae_to_diffusers({f"vae.{k}": v for k, v in ldm.items()})
    assert prefixed.keys() == sd.keys()

    inferred = vae_config_from_ldm({k: tuple(v.shape) for k, v in ldm.items()})
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "down_block_types", "up_block_types"):
        assert inferred[key] == config[key], key
    assert inferred["decoder_block_out_channels"] == config.get("decoder_block_out_channels")
    rebuilt = vae_mod.build_on_meta(inferred)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in sd.items()}


# The name map against an independent reference. The round trip above checks the converter against its own
# inverse: both directions read one table, so a wrong entry (q and k swapped, say) converts there and back
# unnoticed. diffusers' own LDM VAE conversion does not share that table.


def diffusers_ldm_vae_to_diffusers(ldm: dict, config: dict) -> dict:
    """An LDM (BFL) VAE state dict read by diffusers' own code: ``convert_ldm_vae_checkpoint`` (the conversion
    diffusers' single-file loading uses for LDM VAEs), after the two FLUX.2 differences as diffusers'
    scripts/convert_flux2_to_diffusers.py spells them (DIFFUSERS_VAE_TO_FLUX2_MAPPING): the quant convs nested
    in encoder/decoder, and the batch-norm statistics under their own names."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = dict(ldm)
    for nested, top in (("encoder.quant_conv.", "quant_conv."), ("decoder.post_quant_conv.", "post_quant_conv.")):
        for k in [k for k in sd if k.startswith(nested)]:
            sd[top + k[len(nested):]] = sd.pop(k)
    out = convert_ldm_vae_checkpoint(sd, config)
    out.update({k: sd[k] for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked") if k in sd})
    return out


def name_map_differences(config: dict) -> list[str]:
    """Where our LDM <-> diffusers map disagrees with diffusers' own conversion, value by value, both ways."""
    sd = build_tiny_vae(seed=3, config=config).state_dict()
    ldm = convert_diffusers_vae_to_ldm(sd)
    theirs = diffusers_ldm_vae_to_diffusers(ldm, config)
    problems = [f"missing in diffusers' reading of our file: {k}" for k in sd if k not in theirs]
    problems += [f"diffusers reads our {k} as another tensor" for k in sd if k in theirs and not torch.equal(theirs[k], sd[k])]
    ours = convert_ldm_vae_to_diffusers(ldm)
    problems += [f"ours reads {k} differently from diffusers" for k in theirs
                 if k not in ours or not torch.equal(ours[k], theirs[k])]
    return problems


@pytest.mark.parametrize(
    "config",
    [
        tiny_vae_config(),
        {**tiny_vae_config(), "layers_per_block": 2, "decoder_block_out_channels": [32, 32, 64, 96]},
    ],
    ids=["tiny", "wider-decoder"],
)
def test_name_map_agrees_with_diffusers_ldm_conversion_value_by_value(config):
    assert name_map_differences(config) == []


def test_name_map_check_catches_q_and_k_swapped(monkeypatch):
    """Mutation: q and k swapped in the one table both directions read. The round trip still passes; the
    comparison with diffusers' conversion does not."""
    from flux2kit.pipelines.files import vae_checkpoint

    swapped = {"norm": "group_norm", "q": "to_k", "k": "to_q", "v": "to_v", "proj_out": "to_out.0"}
    monkeypatch.setattr(vae_checkpoint, "_ATTN_PARTS", swapped)
    monkeypatch.setattr(vae_checkpoint, "_ATTN_PARTS_TO_LDM", {v: k for k, v in swapped.items()})
    sd = build_tiny_vae(seed=3).state_dict()
    back = convert_ldm_vae_to_diffusers(convert_diffusers_vae_to_ldm(sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)  # what the round trip sees: nothing wrong
    problems = name_map_differences(tiny_vae_config())
    assert any("mid_block.attentions.0.to_q.weight" in p for p in problems), problems


def test_real_size_names_map_as_diffusers_maps_them():
    """The real VAE's 251 names, each tensor tagged with its own number: diffusers' conversion of our LDM
    names must hand every tag back to the parameter it came from."""
    with torch.device("meta"):
        model = AutoencoderKLFlux2()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tagged = {k: torch.full((1,) * len(s), float(i)) for i, (k, s) in enumerate(shapes.items())}
    ldm = convert_diffusers_vae_to_ldm(tagged)
    assert ldm.keys() == bfl_autoencoder_shapes().keys()
    back = diffusers_ldm_vae_to_diffusers(ldm, dict(model.config))
    assert back.keys() == tagged.keys()
    for k, t in tagged.items():
        assert back[k].item() == t.item(), (k, back[k].item(), t.item())
    ours = convert_ldm_vae_to_diffusers(ldm)
    assert all(ours[k].item() == t.item() for k, t in tagged.items())


def test_unknown_ldm_key_is_refused():
    ldm = convert_diffusers_vae_to_ldm(build_tiny_vae().state_dict())
    ldm["encoder.down.0.attn.0.q.weight"] = torch.zeros(1)
    with pytest.raises(Flux2KitError, match="Unexpected keys"):
        convert_ldm_vae_to_diffusers(ldm)


def test_real_size_vae_has_the_real_key_names_and_shapes():
    with torch.device("meta"):
        model = AutoencoderKLFlux2()  # diffusers' defaults are the real FLUX.2 VAE
    sd = model.state_dict()
    assert sum(t.numel() for k, t in sd.items() if not k.startswith("bn.")) == 84_046_115  # 84M parameters
    ldm = {k: tuple(v.shape) for k, v in convert_diffusers_vae_to_ldm(sd).items()}

    expected = bfl_autoencoder_shapes()
    assert len(expected) == 251
    assert ldm == expected
    for name, shape in REAL_VAE_KEYS.items():
        assert ldm[name] == shape, name
    for name in REAL_VAE_ABSENT:
        assert name not in ldm

    config = vae_config_from_ldm(ldm)
    assert config["block_out_channels"] == [128, 256, 512, 512]
    assert config["layers_per_block"] == 2 and config["latent_channels"] == 32
    assert config["decoder_block_out_channels"] is None
    assert config["use_quant_conv"] and config["use_post_quant_conv"] and config["mid_block_add_attention"]
    default = dict(model.config)
    for key in ("in_channels", "out_channels", "norm_num_groups", "batch_norm_eps", "latent_channels"):
        assert config[key] == default[key], key

    # and back: the real names convert to exactly the diffusers model's keys
    meta_ldm = convert_diffusers_vae_to_ldm(sd)
    assert convert_ldm_vae_to_diffusers(meta_ldm).keys() == sd.keys()


# --------------------------------------------------------------------------------------------
# Refusals: message names the problem and the fix; no tensor is read


def _sd_style_vae(latent_channels: int, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        norm_num_groups=32,
        **kwargs,
    )
    return {k: v.contiguous() for k, v in convert_diffusers_vae_to_ldm(model.state_dict()).items()}


@pytest.fixture
def no_tensor_reads(monkeypatch):
    from flux2kit.pipelines.files import safetensors as safetensors_io

    def refuse(self, key):
        raise AssertionError(f"tensor {key} read while refusing a file")

    monkeypatch.setattr(safetensors_io.TensorFile, "get", refuse)


def test_sd_vae_is_refused(tmp_path, no_tensor_reads):
    path = str(tmp_path / "sdxl_vae.safetensors")
    save_file(_sd_style_vae(4), path)
    message = r"Stable Diffusion 1\.5/SDXL VAE \(4 latent channels\).*flux2-vae\.safetensors"
    with pytest.raises(Flux2KitError, match=message):
        load_vae(path)


def test_flux1_vae_is_refused(tmp_path, no_tensor_reads):
    path = str(tmp_path / "ae.safetensors")
    save_file(_sd_style_vae(16, use_quant_conv=False, use_post_quant_conv=False), path)
    message = (
        r"FLUX\.1/SD3 VAE \(16 latent channels\); "
        r"FLUX\.2 needs its own VAE \(flux2-vae\.safetensors, 32 latent channels with batch-norm statistics\)"
    )
    with pytest.raises(Flux2KitError, match=message):
        load_vae(path)


def test_flux1_vae_diffusers_folder_is_refused(tmp_path, no_tensor_reads):
    model = AutoencoderKL(block_out_channels=(32,), latent_channels=16, norm_num_groups=32)
    model.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    with pytest.raises(Flux2KitError, match=r"FLUX\.1/SD3 VAE \(16 latent channels\)"):
        load_vae(str(tmp_path))


@pytest.mark.parametrize("drop", [["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"], ["bn.running_var"]])
def test_missing_batch_norm_statistics_are_refused(files, tmp_path, drop, no_tensor_reads):
    sd = load_file(files["ldm"])
    for k in drop:
        sd.pop(k)
    path = str(tmp_path / "no_bn.safetensors")
    save_file(sd, path)
    message = r"lacks the batch-norm statistics.*bn\.running_var.*flux2-vae\.safetensors"
    with pytest.raises(Flux2KitError, match=message):
        load_vae(path)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_transformer_file_is_refused(tmp_path, prefix, no_tensor_reads):
    sd = {
        f"{prefix}img_in.weight": torch.zeros(8, 128),
        f"{prefix}double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8),
        f"{prefix}single_blocks.0.linear1.weight": torch.zeros(40, 8),
    }
    path = str(tmp_path / "flux2_dev_fp8mixed.safetensors")
    save_file(sd, path)
    with pytest.raises(Flux2KitError, match=r"is a diffusion model \(transformer\), not a VAE.*flux2-vae\.safetensors"):
        load_vae(path)


def test_unexpected_key_is_refused(files, tmp_path, no_tensor_reads):
    sd = load_file(files["ldm"])
    sd["encoder.down.0.attn.0.q.weight"] = torch.zeros(32, 32, 1, 1)
    path = str(tmp_path / "extra.safetensors")
    save_file(sd, path)
    message = r"keys a FLUX\.2 VAE does not have: 'encoder\.down\.0\.attn\.0\.q\.weight'"
    with pytest.raises(Flux2KitError, match=message):
        load_vae(path)


def test_wrong_shape_is_refused(files, tmp_path, no_tensor_reads):
    cfg_dir = tmp_path / "vae"
    save_vae_diffusers(build_tiny_vae(), str(cfg_dir))
    config = json.loads((cfg_dir / "config.json").read_text())
    config["block_out_channels"] = [32, 96, 96, 96]  # same keys, other shapes
    (cfg_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(Flux2KitError, match=r"has shape .* expected .*config\.json"):
        load_vae(str(cfg_dir))


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(Flux2KitError, match=r"VAE not found: .*flux2-vae\.safetensors"):
        load_vae(str(tmp_path / "nope.safetensors"))


def test_pickle_file_is_refused(tmp_path):
    path = str(tmp_path / "vae.safetensors")  # the name lies; the header does not
    torch.save({"decoder.conv_in.weight": torch.zeros(1)}, path)
    with pytest.raises(UnsupportedFormatError, match=r"pickle.*never unpickles.*safetensors"):
        load_vae(path)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(tiny_vae_config()))
    torch.save({}, str(tmp_path / "vae" / "diffusion_pytorch_model.bin"))
    with pytest.raises(UnsupportedFormatError, match=r"only pickle weights.*safetensors"):
        load_vae(str(tmp_path))


def test_bad_image_and_latent_shapes(files):
    vae = load_vae(files["ldm"])
    with pytest.raises(Flux2KitError, match=r"multiples of 16.*Crop or resize"):
        vae.encode(torch.zeros(1, 3, 64, 72))
    with pytest.raises(Flux2KitError, match=r"\(batch, 3, height, width\)"):
        vae.encode(torch.zeros(3, 64, 64))
    with pytest.raises(Flux2KitError, match=r"\(batch, 128, height, width\).*FLUX\.1"):
        vae.decode(torch.zeros(1, 16, 8, 8))
