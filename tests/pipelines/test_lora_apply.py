"""Applying LoRAs: parity with diffusers' Flux2Pipeline / Flux2KleinPipeline.load_lora_weights, the cases where
diffusers is wrong or silent (against the merged reference), LoKr and DoRA, FP8 (side branch exact, merge error
bounded), stacking, strengths, switching off, a shared base that is never modified."""

import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from safetensors.torch import save_file
from transformers import Mistral3ForConditionalGeneration

from flux2kit.pipelines.demo_models import lora as demo
from flux2kit.pipelines.demo_models.transformer import fp8_reference, save_transformer
from flux2kit.pipelines.files.lora_formats import read_lora
from flux2kit.pipelines.generation.generate import generate
from flux2kit.pipelines.models.fp8_linear import FP8Linear
from flux2kit.pipelines.models.lora import LoraEntry, LoraTransformer, apply_loras
from flux2kit.pipelines.models.text_encoder import load_text_encoder
from flux2kit.pipelines.models.transformer import load_transformer
from flux2kit.pipelines.models.vae import load_vae
from flux2kit.testing.lora_reference import (
    bfl_weights, diffusers_with_lora, inputs, merged_model, rel, run, run_diffusers,
)

peft = pytest.importorskip("peft")

PIXELS = 2e-5  # max abs difference of [0, 1] pixels, fp32 both sides (the existing parity tests' bound)
FP32 = 5e-6  # relative difference of transformer outputs, fp32 both sides (summation order only)


@pytest.fixture(scope="module")
def ours(transformer_files, tiny_text_encoder, tiny_vae):
    return dict(bfl=load_transformer(transformer_files["bfl"], device="cpu"),
                fp8=load_transformer(transformer_files["comfy-fp8"], device="cpu"),
                text_encoder=load_text_encoder(tiny_text_encoder[2], device="cpu"),
                vae=load_vae(tiny_vae[1], device="cpu"))


@pytest.fixture(scope="module")
def peft_files(tiny_transformer, tmp_path_factory):
    """Two diffusers-format LoRAs (alpha 8 / rank 4 in peft's adapter metadata: scale 2), on every layer."""
    root = tmp_path_factory.mktemp("peft_loras")
    config = dict(tiny_transformer.config)
    out = {}
    for name, seed in (("a", 11), ("b", 12)):
        lora = demo.random_lora(config, rank=4, seed=seed, std=0.03)
        out[name] = (lora, demo.save_lora(lora, str(root / f"{name}.safetensors"), "diffusers", alpha=8.0,
                                          dtype=torch.float32))
    return out


# ---------------------------------------------------------------------------------------------
# Parity with diffusers' pipelines (whole text-to-image runs)


def _dev_pipe(transformer, tiny_text_encoder, tiny_vae):
    _, tokenizer, folder = tiny_text_encoder
    text_encoder = Mistral3ForConditionalGeneration.from_pretrained(f"{folder}/text_encoder", torch_dtype=torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    pipe = Flux2Pipeline(scheduler=scheduler, vae=tiny_vae[0], text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


RUN = dict(prompt="a red fox in fresh snow", width=128, height=96, num_inference_steps=3, seed=1234)


@pytest.mark.parametrize("case, source", [("one", "bfl"), ("strength 0.6", "bfl"), ("stacked 0.7 and -1.3", "bfl"),
                                          ("stacked 0.7 and -1.3", "fp8")])
def test_matches_flux2pipeline_load_lora_weights(case, source, ours, peft_files, tiny_transformer, tiny_text_encoder,
                                                 tiny_vae):
    names, strengths = {"one": (["a"], [1.0]), "strength 0.6": (["a"], [0.6]),
                        "stacked 0.7 and -1.3": (["a", "b"], [0.7, -1.3])}[case]
    reference_weights = fp8_reference(tiny_transformer) if source == "fp8" else copy.deepcopy(tiny_transformer)
    pipe = _dev_pipe(reference_weights, tiny_text_encoder, tiny_vae)
    for n in names:
        pipe.load_lora_weights(peft_files[n][1], adapter_name=n)
    pipe.set_adapters(names, adapter_weights=strengths)
    expected = pipe(prompt=RUN["prompt"], height=RUN["height"], width=RUN["width"],
                    num_inference_steps=RUN["num_inference_steps"], guidance_scale=4.0,
                    generator=torch.Generator("cpu").manual_seed(RUN["seed"]), output_type="pt").images
    expected = expected.permute(0, 2, 3, 1)
    model = apply_loras(ours[source], [LoraEntry(read_lora(peft_files[n][1]), s) for n, s in zip(names, strengths)])
    kw = dict(prompt=RUN["prompt"], width=RUN["width"], height=RUN["height"],
              num_inference_steps=RUN["num_inference_steps"], guidance=4.0, seed=RUN["seed"])
    image = generate(model, ours["text_encoder"], ours["vae"], **kw)
    diff = (image - expected).abs().max().item()
    print(f"LoRA {case} on {source}: max abs pixel difference {diff:.2e}")
    assert diff < PIXELS, diff
    without = generate(ours[source], ours["text_encoder"], ours["vae"], **kw)  # not vacuous: the LoRA shows
    assert (without - expected).abs().max().item() > 100 * PIXELS


def test_matches_flux2kleinpipeline_load_lora_weights(tmp_path, tiny_vae):
    from flux2kit.pipelines.demo_models.qwen3 import build_tiny_qwen3, save_tiny_qwen3
    from flux2kit.pipelines.demo_models.transformer import KLEIN_TEXT_WIDTHS, build_tiny_klein

    klein = build_tiny_klein(seed=3, size="4b")
    qwen, tokenizer = build_tiny_qwen3(seed=0, hidden_size=KLEIN_TEXT_WIDTHS["4b"] // 3)
    save_tiny_qwen3(qwen, tokenizer, str(tmp_path / "qwen"), layout="pipeline")
    lora = demo.random_lora(dict(klein.config), rank=4, seed=21, std=0.03)
    path = demo.save_lora(lora, str(tmp_path / "klein_lora.safetensors"), "diffusers", alpha=4.0, dtype=torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=tiny_vae[0], text_encoder=qwen, tokenizer=tokenizer,
                              transformer=copy.deepcopy(klein), is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(path, adapter_name="k")
    pipe.set_adapters(["k"], adapter_weights=[0.8])
    kw = dict(height=64, width=80, num_inference_steps=2)
    expected = pipe(prompt="a lighthouse", generator=torch.Generator("cpu").manual_seed(5), output_type="pt",
                    **kw).images.permute(0, 2, 3, 1)
    transformer = load_transformer(save_transformer(klein, str(tmp_path / "klein.safetensors"), "bfl"), device="cpu",
                                   klein_mode="distilled")
    text_encoder = load_text_encoder(str(tmp_path / "qwen"), device="cpu")
    image = generate(apply_loras(transformer, [LoraEntry(read_lora(path), 0.8)]), text_encoder,
                     load_vae(tiny_vae[1], device="cpu"), prompt="a lighthouse", seed=5, **kw)
    diff = (image - expected).abs().max().item()
    print(f"[klein] LoRA 0.8: max abs pixel difference {diff:.2e}")
    assert diff < PIXELS
    without = generate(transformer, text_encoder, load_vae(tiny_vae[1], device="cpu"), prompt="a lighthouse", seed=5,
                       **kw)
    assert (without - expected).abs().max().item() > 100 * PIXELS


# ---------------------------------------------------------------------------------------------
# Where diffusers is wrong or silent: ours equals the merged reference (what the file's authors meant)

ADALN = "final_layer.adaLN_modulation.1"


def _bfl_file(tmp_path, lora, fmt, alpha=None, name="x"):
    return read_lora(demo.save_lora(lora, str(tmp_path / f"{name}.safetensors"), fmt, alpha=alpha,
                                    dtype=torch.float32))


def test_final_layer_adaln_rows_are_swapped(tmp_path, ours, tiny_transformer):
    """diffusers' LoRA converter maps BFL's shift|scale rows onto norm_out (scale|shift) without the swap its own
    checkpoint converter makes: the LoRA then shifts where it should scale."""
    lora = demo.random_lora(dict(tiny_transformer.config), rank=4, seed=7, layers=[ADALN, "img_in"])
    sd, _ = demo.lora_state_dict(lora, "bfl")
    right = run_diffusers(merged_model(tiny_transformer, demo.deltas(lora)), inputs())
    a, b = lora[ADALN]
    wrong_b = torch.cat(b.chunk(2)[::-1])
    wrong = run_diffusers(merged_model(tiny_transformer, {ADALN: wrong_b @ a, "img_in": demo.deltas(lora)["img_in"]}),
                          inputs())
    theirs = run_diffusers(diffusers_with_lora(tiny_transformer, sd), inputs())
    mine = run(apply_loras(ours["bfl"], [LoraEntry(_bfl_file(tmp_path, lora, "bfl"))]), inputs())
    assert rel(mine, right) < FP32
    assert rel(theirs, wrong) < FP32 and rel(theirs, right) > 100 * FP32  # the diffusers bug, measured


def test_bfl_lora_down_up_and_alpha(tmp_path, ours, tiny_transformer, caplog):
    """diffusers applies nothing to BFL names with lora_down/up (a warning in its log) and refuses lora_A/B + alpha."""
    lora = demo.random_lora(dict(tiny_transformer.config), rank=4, seed=8,
                            layers=["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "txt_in"])
    right = run_diffusers(merged_model(tiny_transformer, demo.deltas(lora, 2.0)), inputs())
    base = run_diffusers(tiny_transformer, inputs())
    sd, _ = demo.lora_state_dict(lora, "bfl-downup", alpha=2.0)
    assert torch.equal(run_diffusers(diffusers_with_lora(tiny_transformer, sd), inputs()), base)
    sd_alpha, _ = demo.lora_state_dict(lora, "bfl", alpha=2.0)
    with pytest.raises(ValueError, match="alpha"):
        diffusers_with_lora(tiny_transformer, sd_alpha)
    sd_bare, _ = demo.lora_state_dict(lora, "bfl-noprefix")  # no prefix: filtered out, nothing applied
    assert torch.equal(run_diffusers(diffusers_with_lora(tiny_transformer, sd_bare), inputs()), base)
    for fmt in ("bfl-downup", "bfl"):
        mine = run(apply_loras(ours["bfl"], [LoraEntry(_bfl_file(tmp_path, lora, fmt, 2.0, fmt))]), inputs())
        assert rel(mine, right) < FP32, fmt
    bare_right = run_diffusers(merged_model(tiny_transformer, demo.deltas(lora)), inputs())
    mine = run(apply_loras(ours["bfl"], [LoraEntry(_bfl_file(tmp_path, lora, "bfl-noprefix", None, "bare"))]), inputs())
    assert rel(mine, bare_right) < FP32


def test_a_lora_for_another_width_is_a_size_error_in_diffusers(tiny_transformer):
    sd = {"transformer.x_embedder.lora_A.weight": torch.zeros(1, 999),
          "transformer.x_embedder.lora_B.weight": torch.zeros(256, 1)}
    with pytest.raises(RuntimeError, match="size mismatch for x_embedder.lora_A"):
        diffusers_with_lora(tiny_transformer, sd)


def test_kohya_guidance_modulation_and_final_layers_are_applied(tmp_path, ours, tiny_transformer):
    """diffusers' kohya converter drops guidance_in, the three stream modulations and the final adaLN (one warning)."""
    config = dict(tiny_transformer.config)
    dropped = ["guidance_in.in_layer", "guidance_in.out_layer", "double_stream_modulation_img.lin",
               "double_stream_modulation_txt.lin", "single_stream_modulation.lin", ADALN]
    kept = ["double_blocks.1.img_mlp.0", "single_blocks.0.linear1", "img_in", "time_in.in_layer"]
    lora = demo.random_lora(config, rank=4, seed=9, layers=dropped + kept)
    sd, _ = demo.lora_state_dict(lora, "kohya", alpha=2.0)
    deltas = demo.deltas(lora, 2.0)
    theirs = run_diffusers(diffusers_with_lora(tiny_transformer, sd), inputs())
    kept_only = run_diffusers(merged_model(tiny_transformer, {k: deltas[k] for k in kept}), inputs())
    right = run_diffusers(merged_model(tiny_transformer, deltas), inputs())
    assert rel(theirs, kept_only) < FP32 and rel(theirs, right) > 100 * FP32
    mine = run(apply_loras(ours["bfl"], [LoraEntry(_bfl_file(tmp_path, lora, "kohya", 2.0))]), inputs())
    assert rel(mine, right) < FP32


# ---------------------------------------------------------------------------------------------
# LoKr


def _lokr_file(tmp_path, shapes, layers, alpha=2.0, name="lokr"):
    sd, deltas = {}, {}
    for i, layer in enumerate(layers):
        decomposed = not layer.endswith("proj")
        factors = demo.lokr_layer(shapes[layer], rank=4 if decomposed else None, seed=i)
        sd.update({f"diffusion_model.{layer}.{k}": v for k, v in factors.items()})
        sd[f"diffusion_model.{layer}.alpha"] = torch.tensor(alpha)
        w2 = factors["lokr_w2_a"] @ factors["lokr_w2_b"] if decomposed else factors["lokr_w2"]
        # alpha / rank only for a decomposed factor (LyCORIS, ComfyUI, diffusers)
        deltas[layer] = (alpha / 4 if decomposed else 1.0) * torch.kron(factors["lokr_w1"], w2)
    path = str(tmp_path / f"{name}.safetensors")
    save_file(sd, path)
    return path, sd, deltas


def test_lokr_matches_diffusers_and_the_kronecker_merge(tmp_path, ours, tiny_transformer, transformer_files):
    shapes = demo.layer_shapes(dict(tiny_transformer.config))
    layers = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "double_blocks.0.img_mlp.0",
              "single_blocks.0.linear1", "img_in", "double_blocks.1.img_attn.proj"]
    path, sd, deltas = _lokr_file(tmp_path, shapes, layers)
    lokr = read_lora(path)
    assert lokr.summary() == "6 of 6 layers, LoKr, rank 4, alpha 2"
    theirs = run_diffusers(diffusers_with_lora(tiny_transformer, sd, weights=[0.6]), inputs())
    right = run_diffusers(merged_model(tiny_transformer, {k: 0.6 * v for k, v in deltas.items()}), inputs())
    split = load_transformer(transformer_files["diffusers"], device="cpu")
    for model in (ours["bfl"], split):  # a fused-qkv LoKr on separate q, k, v too
        for merge in (False, True):
            mine = run(apply_loras(model, [LoraEntry(lokr, 0.6, merge=merge)]), inputs())
            assert rel(mine, theirs) < FP32 and rel(mine, right) < FP32
    # kohya names: diffusers finds no module for them; ComfyUI and we apply them
    kohya = {k.replace("diffusion_model.", "lora_unet_").replace(".", "_").replace("_lokr_", ".lokr_")
             .replace("_alpha", ".alpha"): v for k, v in sd.items()}
    with pytest.raises(Exception, match="(?i)module|target"):
        diffusers_with_lora(tiny_transformer, kohya, weights=[0.6])
    kohya_path = str(tmp_path / "lokr_kohya.safetensors")
    save_file(kohya, kohya_path)
    kohya_lokr = read_lora(kohya_path)
    assert kohya_lokr.format == "kohya/musubi (lora_unet_, alpha)"
    assert rel(run(apply_loras(ours["bfl"], [LoraEntry(kohya_lokr, 0.6)]), inputs()), right) < FP32
    # on the final adaLN too, where diffusers' LoKr converter has the same missing swap
    path, _, deltas = _lokr_file(tmp_path, shapes, [ADALN], name="lokr_adaln")
    right = run_diffusers(merged_model(tiny_transformer, deltas), inputs())
    assert rel(run(apply_loras(ours["bfl"], [LoraEntry(read_lora(path))]), inputs()), right) < FP32


def test_lokr_on_fused_qkv_then_a_lora_on_q_k_v(tmp_path, ours, tiny_transformer):
    """diffusers fuses q|k|v for the LoKr and then silently ignores a later LoRA on to_q/k/v; both apply here."""
    shapes = demo.layer_shapes(dict(tiny_transformer.config))
    qkv = "double_blocks.0.img_attn.qkv"
    path, sd, lokr_deltas = _lokr_file(tmp_path, shapes, [qkv], name="lokr_qkv")
    lora = demo.random_lora(dict(tiny_transformer.config), rank=4, seed=31, layers=[qkv])
    lora_sd, _ = demo.lora_state_dict(lora, "diffusers")
    theirs = run_diffusers(diffusers_with_lora(tiny_transformer, [sd, lora_sd]), inputs())
    lokr_only = run_diffusers(merged_model(tiny_transformer, lokr_deltas), inputs())
    both = run_diffusers(merged_model(tiny_transformer, {qkv: lokr_deltas[qkv] + demo.deltas(lora)[qkv]}), inputs())
    assert rel(theirs, lokr_only) < FP32 and rel(theirs, both) > 100 * FP32
    lora_path = demo.save_lora(lora, str(tmp_path / "qkv_lora.safetensors"), "diffusers", dtype=torch.float32)
    stacked = apply_loras(ours["bfl"], [LoraEntry(read_lora(path)), LoraEntry(read_lora(lora_path))])
    assert rel(run(stacked, inputs()), both) < FP32


# ---------------------------------------------------------------------------------------------
# DoRA


def test_peft_dora_matches_peft(tmp_path, ours, tiny_transformer, transformer_files):
    """lora_magnitude_vector (diffusers/PEFT files): peft's formula, strength inside the norm; ComfyUI ignores the key."""
    import json

    layers = ["double_blocks.0.img_mlp.0", "double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", ADALN]
    lora = demo.random_lora(dict(tiny_transformer.config), rank=4, seed=5, layers=layers)
    sd, meta = demo.lora_state_dict(lora, "diffusers", alpha=8.0)
    weights = tiny_transformer.state_dict()
    g = torch.Generator().manual_seed(9)
    for key in [k for k in sd if k.endswith("lora_B.weight")]:
        module = key[len("transformer."):-len(".lora_B.weight")]
        w = weights[module + ".weight"].float() + 2.0 * sd[key] @ sd[key.replace("lora_B", "lora_A")]
        sd[f"transformer.{module}.lora_magnitude_vector"] = w.norm(dim=1) * (1 + 0.2 * torch.rand(w.shape[0], generator=g))
    header = json.loads(meta["lora_adapter_metadata"]) | {"transformer.use_dora": True}
    path = str(tmp_path / "peft_dora.safetensors")
    save_file(sd, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(header)})
    dora = read_lora(path)
    assert dora.summary() == "6 of 6 layers, DoRA LoRA, rank 4, alpha 8"
    split = load_transformer(transformer_files["diffusers"], device="cpu")
    for strength in (1.0, 0.5, -0.7):
        theirs = run_diffusers(diffusers_with_lora(tiny_transformer, path, weights=[strength]), inputs())
        plain = run_diffusers(merged_model(tiny_transformer, {k: 2.0 * strength * v for k, v in
                                                              demo.deltas(lora).items()}), inputs())
        assert rel(theirs, plain) > 100 * FP32  # the magnitudes matter
        for model in (ours["bfl"], split):
            for merge in (False, True):
                mine = run(apply_loras(model, [LoraEntry(dora, strength, merge=merge)]), inputs())
                assert rel(mine, theirs) < FP32, (strength, merge)


def comfy_dora_weight(w, delta, dora_scale, strength):
    """ComfyUI 0.29's weight_decompose (comfy/weight_adapter/base.py), in float64: the reference formula.

    Per-row scales (out, 1) divide by the norms of the base weight, per-column (1, in) by those of the
    merged weight; strength interpolates between the base and the decomposed weight.
    """
    w, delta, m = w.double(), delta.double(), dora_scale.double()
    merged = w + delta
    if m.shape[0] == w.shape[0]:
        norm = w.norm(dim=1, keepdim=True)
    else:
        norm = merged.norm(dim=0, keepdim=True)
    decomposed = merged * (m / (norm + torch.finfo(torch.float32).eps))
    return w + strength * (decomposed - w)


@pytest.mark.parametrize("axis", ["in", "out"])
def test_comfyui_dora_scale(axis, tmp_path, ours, tiny_transformer, transformer_files):
    """dora_scale (ComfyUI/LyCORIS/kohya): ComfyUI's formula; diffusers drops the key and applies a plain LoRA."""
    layers = ["double_blocks.0.img_mlp.0", "double_blocks.1.img_attn.qkv", ADALN]
    shapes = demo.layer_shapes(dict(tiny_transformer.config))
    lora = demo.random_lora(dict(tiny_transformer.config), rank=4, seed=5, layers=layers)
    sd, _ = demo.lora_state_dict(lora, "bfl", alpha=2.0)
    g = torch.Generator().manual_seed(11)
    for layer in layers:
        o, i = shapes[layer]
        sd[f"diffusion_model.{layer}.dora_scale"] = torch.rand(*((1, i) if axis == "in" else (o, 1)), generator=g) + 0.5
    path = str(tmp_path / "dora.safetensors")
    save_file(sd, path)
    dora = read_lora(path)
    bfl = bfl_weights(tiny_transformer)
    split = load_transformer(transformer_files["diffusers"], device="cpu")
    for strength in (1.0, 0.6):
        weights = {layer: comfy_dora_weight(bfl[layer + ".weight"], demo.deltas(lora, 2.0)[layer],
                                            sd[f"diffusion_model.{layer}.dora_scale"], strength) for layer in layers}
        right = run_diffusers(merged_model(tiny_transformer, weights=weights), inputs())
        for model in (ours["bfl"], split):
            for merge in (False, True):
                mine = run(apply_loras(model, [LoraEntry(dora, strength, merge=merge)]), inputs())
                assert rel(mine, right) < FP32, (strength, merge)
    # diffusers: no alpha keys (it refuses them, above), no adaLN (its swap bug, above): a plain LoRA, dora_scale dropped
    no_alpha = {k: v for k, v in sd.items() if not k.endswith(".alpha") and ADALN not in k}
    plain = run_diffusers(merged_model(tiny_transformer, {k: v for k, v in demo.deltas(lora).items() if k != ADALN}),
                          inputs())
    assert rel(run_diffusers(diffusers_with_lora(tiny_transformer, no_alpha), inputs()), plain) < FP32


# ---------------------------------------------------------------------------------------------
# FP8: the side branch is exact; merging re-rounds, within a stated bound


@pytest.fixture(scope="module")
def fp8_case(tiny_transformer, tmp_path_factory):
    lora = demo.random_lora(dict(tiny_transformer.config), rank=16, seed=13, std=0.01)
    path = demo.save_lora(lora, str(tmp_path_factory.mktemp("fp8lora") / "l.safetensors"), "bfl", alpha=16.0,
                          dtype=torch.float32)
    reference = run_diffusers(merged_model(fp8_reference(tiny_transformer), demo.deltas(lora, 16.0)), inputs())
    return read_lora(path), reference


def test_side_branch_on_fp8_equals_dequantized_model_plus_lora(ours, fp8_case):
    lora, reference = fp8_case
    model = ours["fp8"]
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    out = run(apply_loras(model, [LoraEntry(lora)]), inputs())
    assert rel(out, reference) < FP32, rel(out, reference)
    after = model.model.state_dict()
    assert all(torch.equal(before[k].view(torch.uint8) if v.element_size() == 1 else before[k],
                           v.view(torch.uint8) if v.element_size() == 1 else v) for k, v in after.items())


def _fp8_step(v: torch.Tensor) -> torch.Tensor:
    """Spacing of float8_e4m3fn values around v (in the scaled domain): 2^(e-3) for normals, 2^-9 below 2^-6."""
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -6)))
    return torch.where(v.abs() < 2.0 ** -6, torch.full_like(v, 2.0 ** -9), 2.0 ** (e - 3))


@pytest.mark.parametrize("rounding, steps", [("nearest", 0.5), ("stochastic", 1.0)])
def test_fp8_merge_error_is_bounded(rounding, steps, ours, fp8_case):
    """Each merged FP8 weight is within half a step (nearest) or one step (stochastic) of W + delta on its new
    scale; the output error against the exact side branch is measured and bounded."""
    lora, reference = fp8_case
    model = ours["fp8"]
    variant = apply_loras(model, [LoraEntry(lora, merge=True, rounding=rounding)])
    out = run(variant, inputs())
    checked = 0
    for path, bindings in variant.merged.by_module.items():
        module = model.model.get_submodule(path)
        if not isinstance(module, FP8Linear):
            continue
        exact = module.dequantized_weight(torch.float32)
        for b in bindings:
            rows = slice(None) if b.dst is None else slice(*b.dst)
            exact[rows] += b.weight_delta(exact[rows].clone())
        new = variant.merged.tensors[path]
        scaled = exact / new["weight_scale"]  # in FP8 units of the new scale
        err = (new["weight"].float() - scaled).abs()
        assert (err <= steps * _fp8_step(scaled) + 1e-6 * scaled.abs()).all(), path  # (+ fp32 rounding of w / scale)
        checked += 1
    assert checked == 20  # every FP8 block linear was merged and checked
    side = run(apply_loras(model, [LoraEntry(lora)]), inputs())
    base = run(model, inputs())
    out_error, effect_error = rel(out, side), rel(out - base, side - base)
    print(f"FP8 merge ({rounding}): output {out_error:.2e} relative to the side branch, LoRA effect {effect_error:.2e}")
    assert out_error < {"nearest": 2e-3, "stochastic": 4e-3}[rounding]
    assert rel(side, reference) < FP32


def test_merge_restores_the_originals_bit_for_bit(ours, fp8_case, peft_files):
    for model, lora in ((ours["fp8"], fp8_case[0]), (ours["bfl"], read_lora(peft_files["a"][1]))):
        before = dict(model.model.state_dict(keep_vars=True))
        copies = {k: v.detach().clone() for k, v in before.items()}
        base_out = run(model, inputs())
        variant = apply_loras(model, [LoraEntry(lora, 0.9, merge=True)])
        merged_out = run(variant, inputs())
        assert rel(merged_out, base_out) > 1e-3
        after = dict(model.model.state_dict(keep_vars=True))
        assert all(after[k] is before[k] for k in before)  # the same tensor objects
        assert all(torch.equal(v.view(torch.uint8) if v.element_size() == 1 else v,
                               copies[k].view(torch.uint8) if v.element_size() == 1 else copies[k])
                   for k, v in after.items())
        assert torch.equal(run(model, inputs()), base_out)
        assert torch.equal(run(variant, inputs()), merged_out)  # and the variant gives the same again


# ---------------------------------------------------------------------------------------------
# One shared base, stacks, strengths, switches


def test_two_variants_share_the_base_and_never_touch_it(ours, peft_files):
    model = ours["bfl"]
    pointers = {k: v.data_ptr() for k, v in model.model.state_dict().items()}
    a = apply_loras(model, [LoraEntry(read_lora(peft_files["a"][1]), 1.0)])
    b = apply_loras(model, [LoraEntry(read_lora(peft_files["b"][1]), -0.5)])
    assert isinstance(a, LoraTransformer) and a.base is model and b.base is model and a.model is model.model
    base_out = run(model, inputs())
    out_a, out_b = run(a, inputs()), run(b, inputs())
    assert torch.equal(run(model, inputs()), base_out)
    assert torch.equal(run(a, inputs()), out_a) and torch.equal(run(b, inputs()), out_b)
    assert rel(out_a, out_b) > 1e-3
    assert {k: v.data_ptr() for k, v in model.model.state_dict().items()} == pointers
    assert not any(m._forward_hooks for m in model.model.modules())
    assert (a.device, a.dtype, a.family, a.text_width) == (model.device, model.dtype, model.family, model.text_width)
    assert a.checkpoint == model.checkpoint + " + LoRA a.safetensors at 1"


def test_stacked_strengths_add_up_and_chain_like_a_stack(ours, peft_files, tiny_transformer):
    (la, pa), (lb, pb) = peft_files["a"], peft_files["b"]
    a, b = read_lora(pa), read_lora(pb)
    deltas = {k: 2.0 * (0.7 * demo.deltas(la)[k] - 1.3 * demo.deltas(lb)[k]) for k in la}
    right = run_diffusers(merged_model(tiny_transformer, deltas), inputs())
    stacked = apply_loras(ours["bfl"], [LoraEntry(a, 0.7), LoraEntry(b, -1.3)])
    chained = apply_loras(apply_loras(ours["bfl"], [LoraEntry(a, 0.7)]), [LoraEntry(b, -1.3)])
    mixed = apply_loras(ours["bfl"], [LoraEntry(a, 0.7, merge=True), LoraEntry(b, -1.3)])
    assert chained.base is ours["bfl"] and len(chained.stack) == 2
    for variant in (stacked, chained, mixed):
        assert rel(run(variant, inputs()), right) < FP32


def test_off_and_zero_strength_change_nothing(ours, peft_files):
    lora = read_lora(peft_files["a"][1])
    base_out = run(ours["fp8"], inputs())
    for entry in (LoraEntry(lora, 1.0, enabled=False), LoraEntry(lora, 0.0),
                  LoraEntry(lora, 1.0, double_blocks=0.0, single_blocks=0.0)):
        variant = apply_loras(ours["fp8"], [entry])
        assert torch.equal(run(variant, inputs()), base_out)
    assert "LoRA" not in apply_loras(ours["fp8"], [LoraEntry(lora, 1.0, enabled=False)]).checkpoint


def test_double_and_single_block_factors(ours, peft_files, tiny_transformer):
    la, path = peft_files["a"]
    factor = {"double_blocks": 0.5, "single_blocks": -2.0}
    deltas = {k: 2.0 * 0.8 * factor.get(k.split(".")[0], 1.0) * v for k, v in demo.deltas(la).items()}
    right = run_diffusers(merged_model(tiny_transformer, deltas), inputs())
    variant = apply_loras(ours["bfl"], [LoraEntry(read_lora(path), 0.8, double_blocks=0.5, single_blocks=-2.0)])
    assert rel(run(variant, inputs()), right) < FP32


def test_block_offload_and_quantize_on_load(transformer_files, ours, fp8_case):
    """FP8 layers made at load time, blocks offloaded: the LoRA gives what it gives on the ComfyUI FP8 file."""
    lora, _ = fp8_case
    model = load_transformer(transformer_files["bfl"], device="cpu", weights="quantize", offload_blocks=True)
    expected = run(apply_loras(ours["fp8"], [LoraEntry(lora)]), inputs())
    moves = model.offload.moves
    out = run(apply_loras(model, [LoraEntry(lora)]), inputs())
    assert model.offload.moves > moves  # the blocks visited the compute device with the hooks on them
    assert rel(out, expected) < FP32
    merged = run(apply_loras(model, [LoraEntry(lora, merge=True)]), inputs())
    assert rel(merged, expected) < 2e-3
