"""LoRA files: every supported format read into the same adapters, what the files say about themselves,
and every kind of bad file refused with a message that names the problem (nothing changed in the model)."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from flux2kit.pipelines.demo_models import lora as demo
from flux2kit.pipelines.errors import Flux2KitError, UnsupportedFormatError
from flux2kit.pipelines.files.lora_formats import convert_lora, read_lora, training_info
from flux2kit.pipelines.models.lora import LoraEntry, apply_loras, check_loras_fit
from flux2kit.pipelines.models.transformer import load_transformer
from flux2kit.testing.lora_reference import inputs, merged_model, rel, run, run_diffusers

# fp32 everywhere: what differs between formats (and from the reference) is summation order only, e.g.
# a fused q|k|v delta against three separate ones. Measured: 5e-7 on every format.
FP32_ROUNDING = 5e-6
ALPHA, RANK, STRENGTH = 2.0, 4, 0.7


@pytest.fixture(scope="module")
def models(transformer_files):
    """Our transformer loaded from a BFL file (fused q|k|v) and from a diffusers folder (separate q, k, v)."""
    return {"fused": load_transformer(transformer_files["bfl"], device="cpu"),
            "split": load_transformer(transformer_files["diffusers"], device="cpu")}


@pytest.fixture(scope="module")
def lora(tiny_transformer):
    """A rank-4 LoRA on every linear layer of the tiny [dev], random (and non-symmetric: the adaLN swap shows)."""
    return demo.random_lora(dict(tiny_transformer.config), rank=RANK, seed=3)


@pytest.fixture(scope="module")
def reference(tiny_transformer, lora):
    """diffusers' model with the deltas merged in by diffusers' own checkpoint converter."""
    deltas = {k: STRENGTH * v for k, v in demo.deltas(lora, ALPHA).items()}
    return run_diffusers(merged_model(tiny_transformer, deltas), inputs())


@pytest.fixture(scope="module")
def files(lora, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_formats")
    # fp32 files, so that every format holds exactly the same numbers
    return {fmt: demo.save_lora(lora, str(root / f"{fmt}.safetensors"), fmt, alpha=ALPHA, dtype=torch.float32)
            for fmt in demo.LORA_FORMATS}


@pytest.mark.parametrize("layout", ["fused", "split"])
@pytest.mark.parametrize("fmt", demo.LORA_FORMATS)
def test_every_format_gives_the_reference_output(fmt, layout, files, models, reference):
    """ComfyUI/BFL (A/B, down/up, no prefix, base_model.model.), kohya, diffusers/PEFT (alpha from its metadata),
    LyCORIS names: the same LoRA in each gives diffusers' merged model's output, on fused and split q|k|v."""
    model = models[layout]
    base_out = run(model, inputs())
    out = run(apply_loras(model, [LoraEntry(read_lora(files[fmt]), STRENGTH)]), inputs())
    assert rel(out, reference) < FP32_ROUNDING, rel(out, reference)
    assert rel(base_out, reference) > 100 * FP32_ROUNDING  # the LoRA changes the output for real
    assert torch.equal(run(model, inputs()), base_out)  # and is gone once the variant has run


EXPECTED_FORMATS = {
    "bfl": "ComfyUI/BFL (diffusion_model., lora_A/lora_B, alpha)",
    "bfl-downup": "ComfyUI/BFL (diffusion_model., lora_down/lora_up, alpha)",
    "bfl-noprefix": "ComfyUI/BFL (no prefix, lora_A/lora_B, alpha)",
    "bfl-base-model": "ComfyUI/BFL (base_model.model., lora_A/lora_B, alpha)",
    "kohya": "kohya/musubi (lora_unet_, lora_down/lora_up, alpha)",
    "diffusers": "diffusers/PEFT (transformer., lora_A/lora_B, alpha)",
    "lycoris": "LyCORIS/ComfyUI (diffusers names) (lycoris_, lora_down/lora_up, alpha)",
}


@pytest.mark.parametrize("fmt", demo.LORA_FORMATS)
def test_format_and_match_report_in_the_files_own_layers(fmt, files):
    lora = read_lora(files[fmt])
    assert lora.format == EXPECTED_FORMATS[fmt]
    # 31 BFL layers; diffusers names split each of the 4 fused q|k|v layers into 3 (39 layers)
    layers = 39 if fmt in ("diffusers", "lycoris") else 31
    assert lora.summary() == f"{layers} of {layers} layers, rank 4, alpha 2"
    assert lora.width == 256 and not lora.warnings()


def test_mixed_ranks_and_alphas_are_listed(tiny_transformer, tmp_path):
    config = dict(tiny_transformer.config)
    a = demo.random_lora(config, rank=4, seed=1, layers=["img_in", "txt_in", "double_blocks.0.img_mlp.0"])
    b = demo.random_lora(config, rank=8, seed=2, layers=["single_blocks.1.linear1"])
    sd, _ = demo.lora_state_dict({**a, **b}, "kohya", alpha=4.0)
    sd["lora_unet_img_in.alpha"] = torch.tensor(1.0)
    lora = convert_lora(sd, name="mixed.safetensors")
    assert lora.summary() == "4 of 4 layers, mixed ranks: 4 (3 layers), 8 (1 layers), mixed alphas: 4 (3 layers), 1 (1 layers)"
    scales = {x.source: x.scale for x in lora.adapters}
    assert scales == {"lora_unet_img_in": 0.25, "lora_unet_txt_in": 1.0, "lora_unet_double_blocks_0_img_mlp_0": 1.0,
                      "lora_unet_single_blocks_1_linear1": 0.5}


def test_peft_metadata_scales_equal_peft(tiny_transformer, tmp_path):
    """lora_alpha, alpha_pattern, rank_pattern and use_rslora from the adapter metadata give peft's own scaling."""
    pytest.importorskip("peft")
    from flux2kit.testing.lora_reference import diffusers_with_lora

    config = dict(tiny_transformer.config)
    lora = demo.random_lora(config, rank=4, seed=4, layers=["double_blocks.0.img_attn.qkv", "img_in"])
    lora.update(demo.random_lora(config, rank=8, seed=5, layers=["double_blocks.1.img_mlp.0"]))
    sd, _ = demo.lora_state_dict(lora, "diffusers")
    modules = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in sd})
    for meta, name in ((dict(r=4, lora_alpha=8, alpha_pattern={"transformer_blocks.0.attn.to_k": 2},
                             rank_pattern={"transformer_blocks.1.ff.linear_in": 8}), "patterns"),
                       (dict(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"transformer_blocks.1.ff.linear_in": 8}),
                        "rslora")):
        header = {f"transformer.{k}": v for k, v in {**meta, "target_modules": modules}.items()}
        path = str(tmp_path / f"{name}.safetensors")
        save_file(sd, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(header)})
        ours = {a.source.removeprefix("transformer."): a.scale for a in read_lora(path).adapters}
        model = diffusers_with_lora(tiny_transformer, path)
        theirs = {m: model.get_submodule(m).scaling["l0"] for m in ours}
        assert ours == pytest.approx(theirs, rel=1e-7), name
        assert len(set(ours.values())) > 1


def test_training_metadata_is_shown(tmp_path, tiny_transformer):
    lora = demo.random_lora(dict(tiny_transformer.config), rank=2, seed=1, layers=["img_in"])
    tags = {"set": {"ohwx dog": 12, "grass": 3, "dog": 8}}
    path = demo.save_lora(lora, str(tmp_path / "meta.safetensors"), "kohya", metadata={
        "ss_output_name": "my dog", "ss_base_model_version": "flux2_dev", "ss_tag_frequency": json.dumps(tags),
        "modelspec.trigger_phrase": "ohwx dog", "ss_training_comment": "x" * 500})
    info = training_info(read_lora(path).metadata)
    assert info["title"] == "my dog" and info["trigger words"] == "ohwx dog" and info["base model"] == "flux2_dev"
    assert info["frequent tags"] == "ohwx dog, dog, grass"
    assert len(info["description"]) == 203  # long strings are cut, never dumped whole


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error (or a warning for a partly matching file), nothing changed in the model


def _untouched(model, before):
    """No hook left behind, every weight the same tensor with the same values."""
    assert not any(m._forward_hooks for m in model.model.modules())
    now = dict(model.model.state_dict(keep_vars=True))
    assert all(now[k] is t for k, t in before.items())
    return True


@pytest.fixture
def snapshot(models):
    return dict(models["fused"].model.state_dict(keep_vars=True))


def _save(sd, path, metadata=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return str(path)


FLUX1_FILES = {
    "bfl names": {"diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight": (4, 256),
                  "diffusion_model.double_blocks.0.img_mod.lin.lora_B.weight": (1536, 4),
                  "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (4, 256),
                  "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": (768, 4)},
    "kohya names": {"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": (4, 3072),
                    "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": (18432, 4)},
    "diffusers names": {"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": (4, 3072),
                        "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": (12288, 4)},
    "shapes only (4x MLP)": {"diffusion_model.double_blocks.0.img_mlp.0.lora_A.weight": (4, 3072),
                             "diffusion_model.double_blocks.0.img_mlp.0.lora_B.weight": (12288, 4)},
}


@pytest.mark.parametrize("kind", list(FLUX1_FILES))
def test_flux1_lora_is_refused(kind, tmp_path):
    path = _save({k: torch.zeros(s) for k, s in FLUX1_FILES[kind].items()}, tmp_path / "flux1_style.safetensors")
    with pytest.raises(Flux2KitError, match=r"flux1_style.safetensors is a LoRA for FLUX.1 \(e.g. its layer .+\), "
                                            r"not FLUX.2.+trained on FLUX.2"):
        read_lora(path)


def test_sdxl_lora_is_refused(tmp_path):
    path = _save({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 320),
                  "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(320, 4),
                  "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
                  "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4)},
                 tmp_path / "sdxl.safetensors")
    with pytest.raises(Flux2KitError, match=r"sdxl.safetensors is a LoRA for Stable Diffusion / SDXL \(e.g. its layer "
                                            r"lora_unet_input_blocks_4_1_proj_in\), not FLUX.2"):
        read_lora(path)


def test_text_encoder_only_lora_says_it_changes_nothing(tmp_path):
    path = _save({"text_encoder.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
                  "text_encoder.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)},
                 tmp_path / "te.safetensors")
    with pytest.raises(Flux2KitError, match=r"te.safetensors only changes a text encoder \(1 layers, e.g. "
                                            r"text_encoder.model.layers.0.self_attn.q_proj\); flux2kit applies LoRAs to "
                                            r"the FLUX.2 transformer only"):
        read_lora(path)


def test_partly_matching_file_warns_and_applies_the_rest(tiny_transformer, tmp_path, models, snapshot):
    lora = demo.random_lora(dict(tiny_transformer.config), rank=2, seed=1, layers=["img_in", "txt_in"])
    sd, _ = demo.lora_state_dict(lora, "kohya")
    sd.update({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2),
               "lora_unet_some_custom_layer.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_some_custom_layer.lora_up.weight": torch.zeros(8, 2),
               "lora_unet_img_in.lora_up.bias": torch.zeros(256),
               "stray_tensor": torch.zeros(3)})
    result = read_lora(_save(sd, tmp_path / "partial.safetensors"))
    assert result.summary().startswith("2 of 5 layers, rank 2")
    assert result.warnings() == [
        "1 of 5 layers not applied (text-encoder layers: flux2kit applies LoRAs to the transformer only), e.g. "
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
        "1 of 5 layers not applied (bias deltas: FLUX.2's linear layers have no bias (the weights are applied)), e.g. "
        "lora_unet_img_in",
        "2 of 5 layers not applied (no matching FLUX.2 layer), e.g. lora_unet_some_custom_layer, stray_tensor"]
    out = run(apply_loras(models["fused"], [LoraEntry(result, 1.0)]), inputs())
    ref = run_diffusers(merged_model(tiny_transformer, demo.deltas(lora)), inputs())
    assert rel(out, ref) < FP32_ROUNDING
    assert _untouched(models["fused"], snapshot)


def test_keys_that_match_no_layer_are_named(tmp_path):
    path = _save({"foo.bar.lora_A.weight": torch.zeros(2, 8), "foo.bar.lora_B.weight": torch.zeros(8, 2),
                  "something_else": torch.zeros(1)}, tmp_path / "nonsense.safetensors")
    with pytest.raises(Flux2KitError, match=r"nonsense.safetensors: none of its 2 layers matches a FLUX.2 transformer "
                                            r"layer \(e.g. foo.bar, something_else\)"):
        read_lora(path)


def test_rank_mismatch_names_the_layer(tmp_path):
    path = _save({"diffusion_model.img_in.lora_A.weight": torch.zeros(4, 128),
                  "diffusion_model.img_in.lora_B.weight": torch.zeros(256, 3)}, tmp_path / "r.safetensors")
    with pytest.raises(Flux2KitError, match=r"LoRA layer diffusion_model.img_in: the down matrix has rank 4 but the up "
                                            r"matrix \(256, 3\) has rank 3"):
        read_lora(path)


def test_missing_half_names_the_layer(tmp_path):
    path = _save({"diffusion_model.img_in.lora_A.weight": torch.zeros(4, 128)}, tmp_path / "half.safetensors")
    with pytest.raises(Flux2KitError, match=r"LoRA layer diffusion_model.img_in has down \(lora_A\) but no up "
                                            r"\(lora_B\): the file is incomplete"):
        read_lora(path)


def test_shape_mismatch_against_the_model_names_the_layer(tmp_path, models, snapshot):
    path = _save({"diffusion_model.txt_in.lora_A.weight": torch.zeros(4, 999),
                  "diffusion_model.txt_in.lora_B.weight": torch.zeros(256, 4)}, tmp_path / "shape.safetensors")
    with pytest.raises(Flux2KitError, match=r"shape.safetensors: layer diffusion_model.txt_in has shape 256x999 \(out x "
                                            r"in\) but the transformer's context_embedder is 256x384"):
        apply_loras(models["fused"], [LoraEntry(read_lora(path))])
    assert _untouched(models["fused"], snapshot)


def test_pickle_is_refused_unopened(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("evil.pt", "evil.safetensors"):  # by its extension, and by its first bytes under another name
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"lora_unet_img_in.lora_down.weight": Payload()}, protocol=4))
        with pytest.raises(UnsupportedFormatError, match=f"{name} is a pickle"):
            read_lora(path)
    assert not marker.exists()


def test_truncated_file(tmp_path, tiny_transformer):
    lora = demo.random_lora(dict(tiny_transformer.config), rank=2, seed=1, layers=["img_in", "txt_in"])
    path = demo.save_lora(lora, str(tmp_path / "cut.safetensors"))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) - 500])
    with pytest.raises(Flux2KitError, match=r"cut.safetensors is truncated.+download it again"):
        read_lora(path)


def test_loha_is_refused_by_name(tmp_path):
    path = _save({"lora_unet_img_in.hada_w1_a": torch.zeros(256, 2), "lora_unet_img_in.hada_w1_b": torch.zeros(2, 128),
                  "lora_unet_img_in.hada_w2_a": torch.zeros(256, 2), "lora_unet_img_in.hada_w2_b": torch.zeros(2, 128)},
                 tmp_path / "loha.safetensors")
    with pytest.raises(UnsupportedFormatError, match=r"lora_unet_img_in is a LoHa \(hada_\*\) adapter, which flux2kit "
                                                     r"does not apply"):
        read_lora(path)


def _real_shaped_lora(tmp_path, width, text_width, name, guidance=False):
    """A LoRA with a real model's widths (rank 1, few layers: small)."""
    layers = {f"double_blocks.0.img_attn.qkv": (3 * width, width), "txt_in": (width, text_width),
              "single_blocks.19.linear2": (width, 4 * width)}
    if guidance:
        layers["guidance_in.in_layer"] = (width, 256)
    sd = {}
    for layer, (o, i) in layers.items():
        sd[f"diffusion_model.{layer}.lora_A.weight"] = torch.zeros(1, i, dtype=torch.bfloat16)
        sd[f"diffusion_model.{layer}.lora_B.weight"] = torch.zeros(o, 1, dtype=torch.bfloat16)
    return _save(sd, tmp_path / name)


def test_klein_lora_on_dev_names_both_models(tmp_path, models, snapshot):
    lora = read_lora(_real_shaped_lora(tmp_path, 3072, 7680, "klein4b_style.safetensors"))
    assert lora.model_name == "FLUX.2 [klein] 4B"
    with pytest.raises(Flux2KitError, match=r"klein4b_style.safetensors is a LoRA for FLUX.2 \[klein\] 4B \(width 3072\), "
                                            r"but the transformer is FLUX.2 \[dev\] \(width 256\).+Load FLUX.2 \[klein\] "
                                            r"4B to use this LoRA, or choose a LoRA made for FLUX.2 \[dev\]"):
        apply_loras(models["fused"], [LoraEntry(lora)])
    assert _untouched(models["fused"], snapshot)


@pytest.mark.parametrize("config, lora_width, model_name, lora_name", [
    (dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False),
     6144, "FLUX.2 [klein] 4B", "FLUX.2 [dev]"),
    (dict(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360, guidance_embeds=True),
     4096, "FLUX.2 [dev]", "FLUX.2 [klein] 9B"),
])
def test_real_sized_mismatch_is_found_before_loading(config, lora_width, model_name, lora_name, tmp_path):
    """check_loras_fit reads only the config (a model on the meta device): refused before 30 GB load."""
    text = {6144: 15360, 4096: 12288}[lora_width]
    lora = read_lora(_real_shaped_lora(tmp_path, lora_width, text, "x.safetensors"))
    full = dict(patch_size=1, in_channels=128, out_channels=None, attention_head_dim=128, timestep_guidance_channels=256,
                mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, **config)
    with pytest.raises(Flux2KitError, match=rf"x.safetensors is a LoRA for {lora_name.replace('[', '.').replace(']', '.')}"
                                            rf" \(width {lora_width}\), but the transformer is "
                                            rf"{model_name.replace('[', '.').replace(']', '.')}"):
        check_loras_fit(full, [LoraEntry(lora)], model_name)


def test_dev_lora_with_guidance_or_deeper_blocks_on_klein(tmp_path, klein_model):
    config = dict(klein_model.config)
    dev = demo.random_lora({**config, "guidance_embeds": True}, rank=2, seed=1,
                           layers=["guidance_in.in_layer", "img_in"])
    path = demo.save_lora(dev, str(tmp_path / "dev_guidance.safetensors"))
    with pytest.raises(Flux2KitError, match=r"dev_guidance.safetensors trains the guidance embedding "
                                            r"\(diffusion_model.guidance_in.in_layer\), which only FLUX.2 \[dev\] has; the "
                                            r"transformer is FLUX.2 \[klein\] distilled, which has none"):
        apply_loras(klein_model, [LoraEntry(read_lora(path))])
    deep = demo.random_lora({**config, "num_single_layers": 4}, rank=2, seed=1, layers=["single_blocks.3.linear1"])
    path = demo.save_lora(deep, str(tmp_path / "deep.safetensors"))
    with pytest.raises(Flux2KitError, match=r"deep.safetensors has layer diffusion_model.single_blocks.3.linear1 \(single "
                                            r"block 3\), but the transformer \(FLUX.2 \[klein\] distilled\) has 2 single "
                                            r"blocks"):
        apply_loras(klein_model, [LoraEntry(read_lora(path))])


@pytest.fixture(scope="module")
def klein_model(tmp_path_factory):
    from flux2kit.pipelines.demo_models.transformer import build_tiny_klein, save_transformer

    path = save_transformer(build_tiny_klein(seed=1), str(tmp_path_factory.mktemp("klein") / "k.safetensors"), "bfl",
                            is_distilled=True)
    return load_transformer(path, device="cpu")


def test_mixed_model_sizes_in_one_file(tmp_path):
    path = _save({"diffusion_model.img_in.lora_A.weight": torch.zeros(2, 128),
                  "diffusion_model.img_in.lora_B.weight": torch.zeros(3072, 2),
                  "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.zeros(2, 6144),
                  "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": torch.zeros(6144, 2)},
                 tmp_path / "mixed.safetensors")
    with pytest.raises(Flux2KitError, match=r"mixed.safetensors mixes layers of different model sizes \(widths \[3072, "
                                            r"6144\]\)"):
        read_lora(path)


def test_missing_file(tmp_path):
    with pytest.raises(Flux2KitError, match="not found"):
        read_lora(os.path.join(tmp_path, "nope.safetensors"))
