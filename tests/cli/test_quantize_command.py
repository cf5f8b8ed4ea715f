"""``flux2kit quantize``: a transformer or a text encoder folder to one FP8 file (cli/quantize.py)."""

import pytest

from flux2kit.pipelines.errors import Flux2KitError
from flux2kit.pipelines.models.fp8_linear import fp8_linears
from flux2kit.pipelines.models.text_encoder import load_text_encoder
from flux2kit.pipelines.models.transformer import load_transformer
from flux2kit.testing.tensors import same_tensors


def test_quantize_command(transformer_files, tiny_text_encoder, tmp_path, capsys):
    import argparse

    from flux2kit.cli.quantize import add_quantize_arguments, quantize_command

    parser = argparse.ArgumentParser()
    add_quantize_arguments(parser)
    out = tmp_path / "t.safetensors"
    assert quantize_command(parser.parse_args([transformer_files["bfl"], str(out)])) == 0
    assert capsys.readouterr().out.strip() == str(out)
    reference = load_transformer(transformer_files["bfl"], device="cpu", weights="quantize")
    assert same_tensors(load_transformer(out, device="cpu").model.state_dict(), reference.model.state_dict()) == []
    with pytest.raises(Flux2KitError, match="already exists.*--force"):
        quantize_command(parser.parse_args([transformer_files["bfl"], str(out)]))
    te_out = tmp_path / "te.safetensors"
    assert quantize_command(parser.parse_args([tiny_text_encoder[2], str(te_out)])) == 0
    assert len(fp8_linears(load_text_encoder(str(te_out)).model)) == 7 * 30
    with pytest.raises(Flux2KitError, match="does not exist"):
        quantize_command(parser.parse_args([str(tmp_path / "nope"), str(tmp_path / "x.safetensors")]))
