"""Prompt upsampling on the tiny Mistral 3 (32 layers, LM head, tiny Pixtral vision tower), against diffusers.

References: diffusers' ``Flux2Pipeline.upsample_prompt`` on the very model the files were written from (same
prompt, images, temperature, ``torch.manual_seed``), with transformers' ``PixtralProcessor`` as the pipeline's
tokenizer for image-to-image (flux2kit.testing.upsampling); the trimmed encoder ``load_text_encoder`` for the
embeddings. Texts are compared exactly, embeddings bit for bit. The random model never ends its text, so each
generation is a few tokens (diffusers' fixed 512 is cut through a wrapper of the same ``generate``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flux2kit.pipelines.demo_models.comfy_text_encoders import save_tiny_mistral3_comfy, save_tiny_qwen3_comfy
from flux2kit.pipelines.demo_models.qwen3 import build_tiny_qwen3, save_tiny_qwen3
from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.models.full_text_encoder import FullTextEncoder, load_full_text_encoder
from flux2kit.pipelines.models.text_encoder import load_text_encoder
from flux2kit.pipelines.prompting import upsample as U
from flux2kit.pipelines.prompting.pixtral_inputs import PixtralInputs
from flux2kit.testing.upsampling import diffusers_upsample, reference_processor

N = 6  # new tokens per generation: a few seconds each on the tiny model
PROMPT = "a red fox in the snow"


def picture(w, h, seed=0):
    return PIL.Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tiny(tiny_text_encoder):
    model, tokenizer, folder = tiny_text_encoder
    return model, tokenizer, folder


@pytest.fixture(scope="module")
def full(tiny):
    return load_full_text_encoder(tiny[2])


@pytest.fixture(scope="module")
def processor(tiny):
    model, tokenizer, _ = tiny
    return reference_processor(tokenizer, model.config)


@pytest.fixture(scope="module")
def text_only_folder(tiny, tmp_path_factory):
    """A text-only Mistral (MistralForCausalLM: ``model.*`` + ``lm_head.weight``), as community conversions are."""
    model, tokenizer, _ = tiny
    folder = tmp_path_factory.mktemp("text_only")
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            state["model." + key[len("model.language_model."):]] = value.to(torch.bfloat16).contiguous()
        elif key == "lm_head.weight":
            state[key] = value.to(torch.bfloat16).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.text_config.to_dict()
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def single_file_with_head(tiny, tmp_path_factory):
    """ComfyUI's single-file layout (with tekken_model) plus the LM head ComfyUI's own files leave out."""
    model, tokenizer, _ = tiny
    path = str(tmp_path_factory.mktemp("single") / "mistral_full.safetensors")
    save_tiny_mistral3_comfy(model, tokenizer, path)
    with safe_open(path, "pt") as f:
        state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    state["lm_head.weight"] = model.lm_head.weight.detach().to(torch.bfloat16).contiguous()
    save_file(state, path, metadata=metadata)
    return path


# -- the whole model encodes like the trimmed one -------------------------------------------------------------

def test_full_model_embeddings_equal_the_trimmed_encoder_bitwise(tiny, full):
    trimmed = load_text_encoder(tiny[2])
    assert isinstance(full, FullTextEncoder) and full.has_vision and full.parts == "full"
    prompts = [PROMPT, "東京の夜景 🦊 café", "", " ".join(["a fox in snow at dawn"] * 120)]
    a, b = full.encode(prompts), trimmed.encode(prompts)
    assert a.embeds.dtype == torch.float32 and torch.equal(a.embeds, b.embeds)
    assert a.token_counts == b.token_counts and a.truncated == b.truncated
    # the FLUX.2 view shares the whole model's modules: no second copy
    assert full.model.layers[0] is full.generator.model.language_model.layers[0]
    whole, read = full.memory()
    assert whole > read and len(full.generator.model.language_model.layers) == 32


def test_fp8_quantized_full_model_encodes_like_the_trimmed_fp8_one(tiny):
    full = load_full_text_encoder(tiny[2], weights="quantize", vision=False)
    trimmed = load_text_encoder(tiny[2], weights="quantize")
    assert torch.equal(full.encode(PROMPT).embeds, trimmed.encode(PROMPT).embeds)
    assert type(full.generator.model.layers[31].mlp.down_proj).__name__ == "FP8Linear"


# -- upsampled text equals diffusers' ------------------------------------------------------------------------

def test_text_to_image_equals_diffusers(tiny, full):
    model, tokenizer, _ = tiny
    reference = diffusers_upsample(model, tokenizer, PROMPT, temperature=0.7, seed=5, max_new_tokens=N)
    ours = U.upsample_prompt(full, PROMPT, temperature=0.7, seed=5, max_new_tokens=N)
    assert ours.text == reference and ours.mode == U.TEXT_TO_IMAGE and not ours.fell_back
    assert ours.new_tokens == N and ours.reached_limit and ours.images_used == 0


def test_image_to_image_equals_diffusers(tiny, full, processor):
    model, _, _ = tiny
    image = picture(80, 48)
    reference = diffusers_upsample(model, processor, PROMPT, [image], temperature=0.7, seed=3, max_new_tokens=N)
    ours = U.upsample_prompt(full, PROMPT, [image], temperature=0.7, seed=3, max_new_tokens=N)
    assert ours.text == reference and ours.mode == U.IMAGE_TO_IMAGE and ours.images_used == 1
    # the image changes the text: the same seed without it gives another one
    assert U.upsample_prompt(full, PROMPT, temperature=0.7, seed=3, max_new_tokens=N).text != reference


def test_several_large_references_are_concatenated_and_capped_like_diffusers(tiny, full, processor):
    """Two references, one larger than 768² pixels: side by side on white, then capped (diffusers' nested form)."""
    model, _, _ = tiny
    images = [picture(1000, 700, 1), picture(300, 500, 2)]
    reference = diffusers_upsample(model, processor, PROMPT, [images], temperature=1.0, seed=9, max_new_tokens=N)
    assert U.upsample_prompt(full, PROMPT, images, temperature=1.0, seed=9, max_new_tokens=N).text == reference
    capped = U.upsampling_image(images)
    assert capped.size == (int(1300 * (768**2 / (1300 * 700)) ** 0.5), int(700 * (768**2 / (1300 * 700)) ** 0.5))


def test_text_only_model_from_a_folder_and_a_single_file_equals_diffusers(tiny, text_only_folder,
                                                                           single_file_with_head, caplog):
    model, tokenizer, _ = tiny
    reference = diffusers_upsample(model, tokenizer, PROMPT, temperature=0.5, seed=11, max_new_tokens=N)
    with caplog.at_level(logging.WARNING):
        for path in (text_only_folder, single_file_with_head):
            encoder = load_full_text_encoder(path)
            assert encoder.parts == "full-text" and not encoder.has_vision
            assert "text-only prompt upsampling" in encoder.notes[0]
            assert U.upsample_prompt(encoder, PROMPT, temperature=0.5, seed=11, max_new_tokens=N).text == reference
            with pytest.raises(Flux2KitError, match="without the vision tower.*Disconnect the images"):
                U.upsample_prompt(encoder, PROMPT, [picture(64, 64)], max_new_tokens=N)


def test_pixtral_inputs_equal_transformers_processor(tiny, full, processor):
    """Token ids, mask, pixels (bit for bit) and sizes as transformers' PixtralProcessor makes them."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    for size in ((80, 48), (33, 200), (64, 64), (1000, 700)):
        image = U.upsampling_image([picture(*size)])
        messages = format_input([PROMPT], U.system_message(U.IMAGE_TO_IMAGE), images=[[image]])
        expected = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="pt", padding="max_length",
                                                 truncation=True, max_length=2048)
        ours, used = U.chat_inputs(full, PROMPT, [picture(*size)])
        assert used == 1
        for key in ("input_ids", "attention_mask", "pixel_values"):
            assert torch.equal(ours[key], expected[key]), (size, key)
        assert ours["image_sizes"].tolist() == [list(map(int, expected["image_sizes"][0]))]


def test_processor_settings_come_from_the_tokenizer_folder(tiny, tmp_path):
    model, _, folder = tiny
    tok_dir = os.path.join(folder, "tokenizer")
    assert PixtralInputs.for_model(model.config, tok_dir).image_processor.size["longest_edge"] == 64
    copy = tmp_path / "tok"
    shutil.copytree(tok_dir, copy)
    raw = json.loads((copy / "preprocessor_config.json").read_text())
    raw["size"] = {"longest_edge": 32}
    (copy / "preprocessor_config.json").write_text(json.dumps(raw))
    assert PixtralInputs.for_model(model.config, str(copy)).image_processor.size["longest_edge"] == 32
    for name in ("preprocessor_config.json", "processor_config.json"):
        (copy / name).unlink()  # no processor files: the model's own vision config
    assert PixtralInputs.for_model(model.config, str(copy)).image_processor.size["longest_edge"] == 64


# -- reproducibility -----------------------------------------------------------------------------------------

def test_same_seed_same_text_other_seed_other_text_and_global_rng_untouched(full):
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    texts = [U.upsample_prompt(full, PROMPT, temperature=0.8, seed=s, max_new_tokens=N).text for s in (7, 7, 8)]
    assert torch.equal(torch.random.get_rng_state(), before)
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_temperature_zero_is_greedy(tiny, full):
    model, tokenizer, _ = tiny
    a = U.upsample_prompt(full, PROMPT, temperature=0.0, seed=1, max_new_tokens=N).text
    assert a == U.upsample_prompt(full, PROMPT, temperature=0.0, seed=2, max_new_tokens=N).text
    inputs = tokenizer.apply_chat_template(
        [[{"role": "system", "content": [{"type": "text", "text": U.system_message(U.TEXT_TO_IMAGE)}]},
          {"role": "user", "content": [{"type": "text", "text": PROMPT}]}]], add_generation_prompt=True,
        tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", truncation=True, max_length=2048)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=N, do_sample=False)
    assert a == tokenizer.batch_decode(ids[:, 2048:], skip_special_tokens=True)[0]


# -- progress, cancel, fallback, limits ----------------------------------------------------------------------

def test_progress_per_token_and_cancel(full):
    steps = []
    U.upsample_prompt(full, PROMPT, max_new_tokens=3, callback=lambda s, t: steps.append((s, t)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    from flux2kit.pipelines.generation.sampling import Cancelled

    with pytest.raises(Cancelled):
        U.upsample_prompt(full, PROMPT, max_new_tokens=3, should_cancel=lambda: True)


def test_no_usable_text_falls_back_to_the_prompt(tiny, caplog):
    encoder = load_full_text_encoder(tiny[2], vision=False)
    head = encoder.generator.lm_head
    bias = torch.zeros(head.out_features)
    bias[encoder.tokenizer.eos_token_id] = 1e4  # the model ends its text at once
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    with caplog.at_level(logging.WARNING, logger="flux2kit"):
        result = U.upsample_prompt(encoder, PROMPT, seed=0, max_new_tokens=N)
    assert result.fell_back and result.text == PROMPT and result.generated == "" and result.new_tokens == 1
    assert not result.reached_limit and "produced no text" in caplog.text


def test_references_that_do_not_fit_the_context_are_left_out(full):
    """A prompt that fills the 2048-token chat leaves no room for the image tokens: upsampled as text, and said."""
    long = " ".join(["fox"] * 2100)
    result = U.upsample_prompt(full, long, [picture(64, 64)], max_new_tokens=1)
    assert result.mode == U.TEXT_TO_IMAGE and result.images_used == 0
    assert any("no reference image fits" in n for n in result.notes)
    assert any("the model reads the first 2048" in n for n in result.notes)
    inputs, used = U.chat_inputs(full, PROMPT, [picture(64, 64), picture(64, 80)])
    assert used == 2 and inputs["input_ids"].shape == (1, 2048)


# -- bad input -----------------------------------------------------------------------------------------------

def test_nothing_to_upsample(full):
    for prompt in ("", "   \n"):
        with pytest.raises(Flux2KitError, match="Nothing to upsample: the prompt is empty"):
            U.upsample_prompt(full, prompt, [])


def test_trimmed_encoder_names_the_loader_option(tiny):
    with pytest.raises(Flux2KitError, match="only the layers FLUX.2 reads.*'full model, for prompt upsampling'"):
        U.upsample_prompt(load_text_encoder(tiny[2]), PROMPT)


def test_bad_numbers(full):
    with pytest.raises(Flux2KitError, match="temperature must be 0-2"):
        U.upsample_prompt(full, PROMPT, temperature=-0.1)
    with pytest.raises(Flux2KitError, match="max_new_tokens must be 1-2048"):
        U.upsample_prompt(full, PROMPT, max_new_tokens=0)


def test_files_without_what_upsampling_needs_are_refused_clearly(tiny, tmp_path):
    model, tokenizer, _ = tiny
    pruned = save_tiny_mistral3_comfy(model, tokenizer, str(tmp_path / "pruned.safetensors"), num_layers=30)
    with pytest.raises(Flux2KitError, match="holds 30 layers of the language model and no final norm.*pruned to the 30 layers FLUX.2 reads"):
        load_full_text_encoder(pruned)
    comfy = save_tiny_mistral3_comfy(model, tokenizer, str(tmp_path / "comfy.safetensors"), fp8=True)
    with pytest.raises(Flux2KitError, match="not its LM head.*ComfyUI's single files leave it out"):
        load_full_text_encoder(comfy)
    assert load_text_encoder(comfy) is not None  # the same files still encode


def test_klein_qwen3_is_refused_with_what_to_use(tmp_path):
    qwen, qtok = build_tiny_qwen3(seed=0, hidden_size=64)
    save_tiny_qwen3(qwen, qtok, str(tmp_path / "klein"), layout="pipeline")
    with pytest.raises(Flux2KitError, match="Qwen3.*does not upsample with Qwen3.*FLUX.2 \\[dev\\]'s text encoder"):
        load_full_text_encoder(str(tmp_path / "klein"))
    with pytest.raises(Flux2KitError, match="FLUX.2 \\[klein\\]'s Qwen3 text encoder.*parts = 'full model"):
        U.upsample_prompt(load_text_encoder(str(tmp_path / "klein")), PROMPT)
    path = save_tiny_qwen3_comfy(qwen, str(tmp_path / "qwen.safetensors"))
    with pytest.raises(Flux2KitError, match="Qwen3"):
        load_full_text_encoder(path, tokenizer=str(tmp_path / "klein" / "tokenizer"))


def test_the_readme_example_runs_on_the_tiny_model(tiny, capsys):
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md"), encoding="utf-8").read()
    code = re.search(r"```python\n(.*?)```", readme[readme.index("## Prompt upsampling"):], re.S).group(1)
    for real, here in (('"models/text_encoders/FLUX.2-dev"', repr(tiny[2])), ('device="cuda"', 'device="cpu"'),
                       ("seed=7)", f"seed=7, max_new_tokens={N})")):
        assert real in code, f"the README example no longer has {real}"
        code = code.replace(real, here)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert scope["result"].new_tokens == N and capsys.readouterr().out == scope["result"].text + "\n"
    assert scope["embeds"].embeds.shape == (1, 512, 3 * tiny[0].config.text_config.hidden_size)
