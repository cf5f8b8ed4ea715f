"""FP8 in the nodes: Save FP8 writes what quantize-on-load holds; the text-encoder loader lists and loads
ComfyUI's single files (the engine side: tests/pipelines/test_quantize.py)."""

import pytest

from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.models.fp8_linear import fp8_linears
from flux2kit.testing.tensors import same_tensors


@pytest.fixture
def comfy_files(comfy, tiny_transformer):
    """A bf16 transformer and an FP8 single-file text encoder in the stand-in's models folders (removed after)."""
    from flux2kit.pipelines.demo_models.comfy_text_encoders import save_tiny_mistral3_comfy
    from flux2kit.pipelines.demo_models.text_encoder import build_tiny_mistral3
    from flux2kit.pipelines.demo_models.transformer import save_transformer

    models = comfy / "models"
    bf16 = models / "diffusion_models" / "tiny_bf16.safetensors"
    save_transformer(tiny_transformer, str(bf16), "bfl")
    model, tok = build_tiny_mistral3(seed=0, hidden_size=128)
    te = models / "text_encoders" / "mistral_3_small_flux2_tiny_fp8.safetensors"
    save_tiny_mistral3_comfy(model, tok, str(te), fp8=True)
    made = [bf16, te, models / "diffusion_models" / "tiny_fp8.safetensors"]
    yield bf16, te
    for path in made:
        if path.exists():
            path.unlink()


def test_save_fp8_node_writes_what_quantize_on_load_holds(comfy_files):
    from flux2kit import nodes as pack

    nodes = {cls.define_schema().node_id: cls for cls in pack.node_list()}
    save = nodes["Flux2KitSaveFP8"]
    schema = save.define_schema()
    assert "tiny_bf16.safetensors" in schema.inputs[0].options and schema.is_output_node
    assert all(i.tooltip for i in schema.inputs)
    out = save.execute(model_name="tiny_bf16.safetensors", filename="tiny_fp8", overwrite=False).result[0]
    assert out == "tiny_fp8.safetensors"
    with pytest.raises(Flux2KitError, match="already exists.*overwrite"):
        save.execute(model_name="tiny_bf16.safetensors", filename="tiny_fp8", overwrite=False)
    with pytest.raises(Flux2KitError, match="not a plain file name"):
        save.execute(model_name="tiny_bf16.safetensors", filename="../escape", overwrite=True)

    loader = nodes["Flux2KitTransformerLoader"]
    assert "fp8 quantize on load" in loader.define_schema().inputs[1].options
    on_load = loader.execute(model_name="tiny_bf16.safetensors", weight_mode="fp8 quantize on load",
                             offload_blocks=False).result[0]
    saved = loader.execute(model_name="tiny_fp8.safetensors", weight_mode="fp8 as stored", offload_blocks=False).result[0]
    assert on_load.quantization == saved.quantization == "comfy-fp8"
    assert same_tensors(on_load.model.state_dict(), saved.model.state_dict()) == []


def test_text_encoder_loader_lists_and_loads_single_files(comfy_files):
    from flux2kit import nodes as pack

    loader = next(c for c in pack.node_list() if c.define_schema().node_id == "Flux2KitTextEncoderLoader")
    schema = loader.define_schema()
    options = schema.inputs[0].options
    assert "mistral_3_small_flux2_tiny_fp8.safetensors" in options and "mistral_3_small_tiny/" in options
    assert not any(o.startswith("mistral_3_small_tiny/") and o != "mistral_3_small_tiny/" for o in options)
    mode = next(i for i in schema.inputs if i.id == "weight_mode")
    assert mode.optional and mode.default == "fp8 as stored"
    stored = loader.execute(text_encoder_name="mistral_3_small_flux2_tiny_fp8.safetensors").result[0]
    assert len(fp8_linears(stored.model)) == 7 * 30
    dense = loader.execute(text_encoder_name="mistral_3_small_flux2_tiny_fp8.safetensors", weight_mode="bf16").result[0]
    assert fp8_linears(dense.model) == []
    folder = loader.execute(text_encoder_name="mistral_3_small_tiny/", weight_mode="fp8 quantize on load").result[0]
    assert len(fp8_linears(folder.model)) == 7 * 30
