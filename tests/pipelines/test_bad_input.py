"""Bad input to a whole run: a clear error naming the problem and the fix, and the next run works."""

import numpy as np
import PIL.Image
import pytest
import torch

from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.generation.generate import generate
from flux2kit.pipelines.models.text_encoder import load_text_encoder
from flux2kit.pipelines.models.transformer import load_transformer
from flux2kit.pipelines.models.vae import load_vae


@pytest.fixture(scope="module")
def parts(transformer_files, tiny_text_encoder, tiny_vae):
    return (load_transformer(transformer_files["comfy-fp8"], device="cpu"),
            load_text_encoder(tiny_text_encoder[2], device="cpu"), load_vae(tiny_vae[1], device="cpu"))


def _run(parts, **kw):
    args = dict(prompt="a cat", width=64, height=64, num_inference_steps=1) | kw
    return generate(*parts, **args)


def test_text_encoder_that_does_not_fit_the_transformer(parts, tmp_path):
    from flux2kit.pipelines.demo_models.text_encoder import build_tiny_mistral3, save_tiny_mistral3

    model, tok = build_tiny_mistral3(hidden_size=64)
    narrow = load_text_encoder(save_tiny_mistral3(model, tok, str(tmp_path / "te"), layout="flat"))
    with pytest.raises(Flux2KitError, match=r"192-wide embeddings but the transformer expects 384.*Mistral-Small-3"):
        generate(parts[0], narrow, parts[2], prompt="a cat", width=64, height=64, num_inference_steps=1)
    assert _run(parts).shape == (1, 64, 64, 3)


# Every VAE refusal ends with where to get flux2-vae.safetensors; this one must also say which model the file is.
SDXL_VAE_REFUSAL = (r"^sdxl_vae\.safetensors is a Stable Diffusion 1\.5/SDXL VAE \(4 latent channels\); "
                    r"FLUX\.2 needs its own VAE \(flux2-vae\.safetensors")


def _sdxl_vae_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "sdxl_vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(512, 4, 3, 3),
               "quant_conv.weight": torch.zeros(8, 8, 1, 1), "post_quant_conv.weight": torch.zeros(4, 4, 1, 1)},
              str(path))
    return path


def test_vae_from_another_model(tmp_path):
    with pytest.raises(Flux2KitError, match=SDXL_VAE_REFUSAL):
        load_vae(_sdxl_vae_file(tmp_path))


def test_vae_refusal_check_catches_an_unnamed_refusal(tmp_path, monkeypatch):
    """Mutation: the SD branch gone, so the file gets the generic refusal. It still carries the flux2-vae
    suffix (all the old match="flux2-vae" checked); the message this test expects is not there."""
    from flux2kit.pipelines.errors import Flux2KitError as Error
    from flux2kit.pipelines.files.vae_checkpoint import GET_FLUX2_VAE
    from flux2kit.pipelines.models import vae as vae_module

    def generic(name, shapes, all_keys):
        raise Error(f"{name} is a VAE with {shapes['decoder.conv_in.weight'][1]} latent channels, not a FLUX.2 VAE; "
                    f"{GET_FLUX2_VAE}")

    monkeypatch.setattr(vae_module, "check_is_flux2_vae", generic)
    path = _sdxl_vae_file(tmp_path)
    with pytest.raises(Flux2KitError, match="flux2-vae"):
        load_vae(path)
    with pytest.raises(AssertionError, match="Regex pattern did not match"):
        with pytest.raises(Flux2KitError, match=SDXL_VAE_REFUSAL):
            load_vae(path)


def test_extreme_reference_aspect(parts):
    strip = PIL.Image.fromarray(np.zeros((8, 4000, 3), dtype=np.uint8))
    with pytest.raises(Flux2KitError, match=r"8x4000|4000x8") as info:
        _run(parts, images=[strip])
    assert "at least 64 pixels" in str(info.value) or "8:1" in str(info.value)
    long = PIL.Image.fromarray(np.zeros((64, 4000, 3), dtype=np.uint8))
    with pytest.raises(Flux2KitError, match=r"aspect ratio must be at most 8:1"):
        _run(parts, images=[long])


def test_five_megapixel_request(parts):
    with pytest.raises(Flux2KitError, match=r"over the 4 MP maximum.*nearest valid size"):
        _run(parts, width=2560, height=2048)


def test_width_not_a_multiple_of_16(parts):
    with pytest.raises(Flux2KitError, match=r"multiples of 16.*nearest valid size is 96x64"):
        _run(parts, width=100, height=64)


def test_eleven_references(parts):
    img = PIL.Image.new("RGB", (64, 64), (200, 10, 10))
    with pytest.raises(Flux2KitError, match="11 reference images.*at most 10"):
        _run(parts, images=[img] * 11)


def test_reference_that_is_not_an_image(parts):
    with pytest.raises(Flux2KitError, match="must be an image"):
        _run(parts, images=["photo.png"])
    with pytest.raises(Flux2KitError, match="must be an image"):
        _run(parts, images=[torch.zeros(64, 64, 7)])


def _grey_and_rgba_references():
    """(references as given, the same references as RGB pictures) for the conversion check."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    colour = rng.integers(0, 256, (80, 64, 3), dtype=np.uint8)
    alpha = np.where(rng.random((80, 64)) < 0.5, 0, 255).astype(np.uint8)  # see-through or opaque
    composited = np.where(alpha[..., None] == 255, colour, 255).astype(np.uint8)  # onto white
    one_channel = torch.rand(1, 64, 64, 1, generator=torch.Generator().manual_seed(0))
    given = [PIL.Image.fromarray(grey, "L"), PIL.Image.fromarray(np.dstack([colour, alpha]), "RGBA"), one_channel]
    as_rgb = [PIL.Image.fromarray(np.dstack([grey] * 3)), PIL.Image.fromarray(composited), one_channel.expand(-1, -1, -1, 3)]
    return given, as_rgb


def check_grey_and_rgba_references(parts):
    """Grey stays grey (each channel the grey level), RGBA is composited onto white (docs/parameters.md,
    "References"), and a whole run with them equals the run with those RGB pictures."""
    from flux2kit.pipelines.generation.references import prepare_reference

    given, as_rgb = _grey_and_rgba_references()
    for i, (a, b) in enumerate(zip(given, as_rgb)):
        assert torch.equal(prepare_reference(a), prepare_reference(b)), f"reference {i + 1}"
    # a part-transparent pixel: alpha * colour + (1 - alpha) * white, to PIL's rounding
    half = np.full((64, 64, 4), (200, 40, 0, 64), dtype=np.uint8)
    expected = (np.array([200, 40, 0]) * 64 + 255 * (255 - 64)) / 255
    got = (prepare_reference(PIL.Image.fromarray(half, "RGBA"))[0, :, 0, 0] + 1) / 2 * 255
    assert np.abs(got.numpy() - expected).max() <= 1.0, (got, expected)
    out = _run(parts, images=given)
    assert out.shape == (1, 64, 64, 3)
    assert torch.equal(out, _run(parts, images=as_rgb))


def test_grayscale_and_rgba_references_are_converted(parts):
    check_grey_and_rgba_references(parts)


def test_grey_check_catches_grey_read_as_red(parts, monkeypatch):
    """Mutation: grey L mapped to (L, 0, 0). Every shape stays right (what this test used to check)."""
    from flux2kit.pipelines.generation import references

    original = references.to_rgb

    def grey_as_red(image):
        if image.mode == "L":
            zero = PIL.Image.new("L", image.size, 0)
            return PIL.Image.merge("RGB", (image, zero, zero))
        return original(image)

    monkeypatch.setattr(references, "to_rgb", grey_as_red)
    given, _ = _grey_and_rgba_references()
    assert _run(parts, images=given).shape == (1, 64, 64, 3)
    with pytest.raises(AssertionError, match="reference 1"):
        check_grey_and_rgba_references(parts)


def test_transparent_pixels_become_white():
    from flux2kit.pipelines.generation.references import prepare_reference

    clear = PIL.Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert torch.equal(prepare_reference(clear), torch.ones(1, 3, 64, 64))


def test_empty_prompt_needs_a_reference(parts):
    with pytest.raises(Flux2KitError, match="prompt is empty"):
        _run(parts, prompt="  ")
    img = PIL.Image.new("RGB", (64, 64), (0, 90, 200))
    assert _run(parts, prompt="", images=[img]).shape == (1, 64, 64, 3)


def test_match_input_image_without_image(parts):
    with pytest.raises(Flux2KitError, match="needs a reference image"):
        _run(parts, width=None, height=None, aspect_ratio="match_input_image")
