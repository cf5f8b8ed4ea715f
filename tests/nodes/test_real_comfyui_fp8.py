"""Files flux2kit writes, read by a real ComfyUI (``COMFYUI_PATH``): FP8 transformers and ComfyUI's Qwen tokenizer.

ComfyUI's own Python (``COMFYUI_PYTHON``, default ``$COMFYUI_PATH/../comfyui-venv/bin/python``) runs a
short script in a subprocess: it loads our saved FP8 transformer with ``comfy.sd.load_diffusion_model``
(what the Load Diffusion Model node calls), runs its diffusion model once on fixed inputs, and the
result is compared with our engine on the same file. Skipped without COMFYUI_PATH.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux2kit.testing.real_comfyui import REPO, ComfyUISetupError, check_setup, comfyui_path, comfyui_python

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                       reason="set COMFYUI_PATH to a ComfyUI checkout to run the real-ComfyUI tests"),
]

# ComfyUI's lines about keys no layer took: "unet unexpected: [...]" (comfy/model_base.py), "clip unexpected"
UNEXPECTED = re.compile(r"\b(unet|clip|model) unexpected\b|\bunexpected keys?\b", re.IGNORECASE)

# fp32 compute on both sides (ComfyUI's CPU manual cast is fp32); only summation order differs.
TOLERANCE = 1e-4

PROBE = textwrap.dedent('''
    import json, logging, os, sys
    # ComfyUI reports keys it could not place ("unet unexpected: [...]") with logging.warning only: to stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    comfy_root, task, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfy_root)
    os.chdir(comfy_root)
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    from safetensors.torch import load_file, save_file
    if task == "transformer":
        import comfy.sd
        patcher = comfy.sd.load_diffusion_model(args["model"])
        dm = patcher.model.diffusion_model
        qkv = dm.double_blocks[0].img_attn.qkv
        inp = load_file(args["inputs"])
        with torch.no_grad():
            out = dm(inp["x"], inp["sigma"], inp["context"], guidance=inp["guidance"])
        save_file({"out": out.float().contiguous()}, args["out"])
        print(json.dumps({"class": type(patcher.model).__name__, "qkv_weight": type(qkv.weight).__name__,
                          "quant_format": getattr(qkv, "quant_format", None),
                          "img_in": str(dm.img_in.weight.dtype)}))
    elif task == "text_encoder":
        # What the Load CLIP node (CLIPLoader, type flux2) runs: comfy.sd.load_clip on the one file, then the
        # CLIP Text Encode node's tokenize + encode. Changed for a tiny file, and only that: the model ComfyUI
        # takes the file for (it goes by the real widths) and, through ComfyUI's own per-model config option,
        # the tiny sizes in place of the 24B ones.
        import comfy.sd
        width_rule, by_width = comfy.sd.detect_te_model, {}

        def detect_te_model(sd):
            by_width["answer"] = str(width_rule(sd))
            return comfy.sd.TEModel.MISTRAL3_24B

        comfy.sd.detect_te_model = detect_te_model
        clip = comfy.sd.load_clip(ckpt_paths=[args["model"]], clip_type=comfy.sd.CLIPType.FLUX2,
                                  model_options={"mistral3_24b_model_config": args["config"]})
        tokens = clip.tokenize(args["prompt"])
        cond = clip.encode_from_tokens(tokens)
        save_file({"cond": cond.float().contiguous()}, args["out"])
        lm = clip.cond_stage_model.mistral3_24b.transformer.model
        q = lm.layers[0].self_attn.q_proj
        print(json.dumps({"ids": [t for t, *_ in tokens["mistral3_24b"][0]], "by_width": by_width["answer"],
                          "q_weight": type(q.weight).__name__, "quant_format": getattr(q, "quant_format", None),
                          "layers": len(lm.layers)}))
    elif task == "klein_tokens":
        import comfy.text_encoders.flux as flux
        tok = flux.KleinTokenizer()
        out = [[t for t, *_ in row] for row in tok.tokenize_with_weights(args["prompt"])["qwen3_4b"]]
        print(json.dumps({"ids": out[0]}))
''')


@pytest.fixture(scope="module", autouse=True)
def comfyui_setup():
    """COMFYUI_PATH is set (else these tests skip): a broken setup fails here, with what to fix."""
    try:
        return check_setup()
    except ComfyUISetupError as e:
        pytest.fail(f"COMFYUI_PATH is set, but the real-ComfyUI tests cannot run: {e}", pytrace=False)


def probe(tmp_path, task: str, **args) -> tuple[dict, str]:
    """(the probe's JSON answer, what ComfyUI logged while doing it: the probe's stderr)."""
    root = comfyui_path()
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([comfyui_python(root), str(script), str(root), task, json.dumps(args)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def run_probe(tmp_path, task: str, **args) -> dict:
    return probe(tmp_path, task, **args)[0]


def unexpected_lines(log: str) -> list[str]:
    """ComfyUI's complaints about keys no layer took ("unet unexpected: [...]", comfy/model_base.py): it loads
    the model anyway, so only its log tells."""
    return [line for line in log.splitlines() if UNEXPECTED.search(line)]


@pytest.fixture(scope="module")
def bf16_transformer(tmp_path_factory):
    from flux2kit.pipelines.demo_models.transformer import build_tiny_transformer, save_transformer

    # head_dim 128: ComfyUI infers the head count as width / 128 (DEVELOPERS.md, "Tiny models")
    root = tmp_path_factory.mktemp("real_fp8")
    return save_transformer(build_tiny_transformer(seed=5), str(root / "bf16.safetensors"), "bfl")


@pytest.mark.parametrize("header_metadata", [True, False], ids=["comfy_quant+header", "comfy_quant-only"])
def test_comfyui_loads_our_fp8_transformer_with_the_same_output(bf16_transformer, tmp_path, header_metadata):
    from flux2kit.pipelines.files.quantize import save_fp8_transformer
    from flux2kit.pipelines.generation.sampling import latent_ids, pack, text_ids, unpack
    from flux2kit.pipelines.models.transformer import load_transformer

    fp8 = save_fp8_transformer(bf16_transformer, tmp_path / "flux2_tiny_fp8mixed.safetensors",
                               header_metadata=header_metadata)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 128, 4, 6, generator=g), torch.randn(1, 16, 384, generator=g)
    sigma, guidance = torch.tensor([0.7]), torch.tensor([4.0])
    save_file({"x": x, "context": ctx, "sigma": sigma, "guidance": guidance}, tmp_path / "in.safetensors")
    info, log = probe(tmp_path, "transformer", model=str(fp8), inputs=str(tmp_path / "in.safetensors"),
                      out=str(tmp_path / "out.safetensors"))
    # every key of our file found its layer: ComfyUI logs the others and goes on (the "unet unexpected" regression)
    assert unexpected_lines(log) == [], "\n".join(unexpected_lines(log))[:4000]
    # ComfyUI detected FLUX.2 and kept the block linears FP8 (its QuantizedTensor); the rest it casts itself
    assert info["class"] == "Flux2"
    assert (info["qkv_weight"], info["quant_format"]) == ("QuantizedTensor", "float8_e4m3fn")
    theirs = load_file(tmp_path / "out.safetensors")["out"]

    ours_model = load_transformer(fp8, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        ours = unpack(ours_model(pack(x), latent_ids(1, 4, 6), ctx, text_ids(1, 16), sigma, guidance), 4, 6)
    err = ((ours - theirs).norm() / theirs.norm()).item()
    assert err < TOLERANCE, err
    # and the numbers are FP8's, not bf16's: the bf16 model differs from ComfyUI's by far more than ours
    bf16 = load_transformer(bf16_transformer, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        dense = unpack(bf16(pack(x), latent_ids(1, 4, 6), ctx, text_ids(1, 16), sigma, guidance), 4, 6)
    assert ((dense - theirs).norm() / theirs.norm()).item() > 100 * err


def test_unexpected_check_catches_full_names_in_the_header(bf16_transformer, tmp_path):
    """Mutation: the regression the check above is for. ``_quantization_metadata`` listing the layers under their
    full names (``model.diffusion_model.``...): ComfyUI's second pass adds comfy_quant keys no layer has, logs
    "unet unexpected: [...]" and loads the model anyway."""
    from flux2kit.pipelines.files.quantize import COMFY_TRANSFORMER_PREFIX, save_fp8_transformer
    from flux2kit.pipelines.files.safetensors import read_header

    good = save_fp8_transformer(bf16_transformer, tmp_path / "good_fp8mixed.safetensors", header_metadata=True)
    metadata = dict(read_header(good).metadata)
    entry = json.loads(metadata["_quantization_metadata"])
    entry["layers"] = {COMFY_TRANSFORMER_PREFIX + k: v for k, v in entry["layers"].items()}
    metadata["_quantization_metadata"] = json.dumps(entry)
    bad = tmp_path / "full_names_fp8mixed.safetensors"
    save_file(load_file(good), bad, metadata=metadata)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 128, 4, 6, generator=g), torch.randn(1, 16, 384, generator=g)
    save_file({"x": x, "context": ctx, "sigma": torch.tensor([0.7]), "guidance": torch.tensor([4.0])},
              tmp_path / "in.safetensors")
    _, log = probe(tmp_path, "transformer", model=str(bad), inputs=str(tmp_path / "in.safetensors"),
                   out=str(tmp_path / "out.safetensors"))
    lines = unexpected_lines(log)
    assert lines and any("unet unexpected" in line for line in lines), log[-4000:]


# -- a text encoder written by `flux2kit quantize`, read by ComfyUI's text-encoder loader ------------------

# head_dim 128: ComfyUI's Mistral-3 config fixes it (a class attribute, not one of the sizes its option sets)
TINY_MISTRAL_FOR_COMFYUI = dict(hidden_size=128, num_layers=32, num_heads=2, num_kv_heads=1, head_dim=128)
MISSING = re.compile(r"\bclip missing\b", re.IGNORECASE)
TEXT_TOLERANCE = 1e-2  # relative; fp32 compute on both sides, the FP8 weights dequantized by each


@pytest.fixture(scope="module")
def quantized_mistral(tmp_path_factory):
    """(the tiny Mistral-3's text config, the FP8 single file ``flux2kit quantize`` wrote from its folder)."""
    import sys

    from flux2kit.pipelines.demo_models.text_encoder import build_tiny_mistral3, save_tiny_mistral3

    root = tmp_path_factory.mktemp("quantized_te")
    model, tokenizer = build_tiny_mistral3(seed=4, **TINY_MISTRAL_FOR_COMFYUI)
    folder = str(root / "Mistral-Small-tiny")
    save_tiny_mistral3(model, tokenizer, folder, layout="pipeline")
    out = root / "mistral_3_small_flux2_tiny_fp8.safetensors"
    result = subprocess.run([sys.executable, "-m", "flux2kit.cli", "quantize", "--kind", "text-encoder", folder,
                             str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return model.config.text_config, out


def comfyui_config(config) -> dict:
    """The tiny sizes for ComfyUI's "mistral3_24b_model_config" option (comfy/sd1_clip.py SDClipModel)."""
    return dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                rms_norm_eps=config.rms_norm_eps, rope_theta=1_000_000_000.0)


def check_comfyui_reads_our_text_encoder(tmp_path, path, config, prompt: str) -> tuple[float, dict]:
    """ComfyUI's loader on ``path``: every tensor placed, FP8 layers kept FP8, our tokens, our embeddings."""
    from flux2kit.pipelines.models.text_encoder import format_messages, load_text_encoder

    info, log = probe(tmp_path, "text_encoder", model=str(path), config=comfyui_config(config), prompt=prompt,
                      out=str(tmp_path / "cond.safetensors"))
    assert [line for line in log.splitlines() if MISSING.search(line)] == [], log[-4000:]
    assert info["layers"] == config.num_hidden_layers
    assert (info["q_weight"], info["quant_format"]) == ("QuantizedTensor", "float8_e4m3fn"), info
    ours = load_text_encoder(path)
    ids = ours.tokenizer.apply_chat_template(format_messages([prompt]), add_generation_prompt=False, tokenize=True,
                                             return_dict=True)["input_ids"][0]
    assert info["ids"] == list(ids), (info["ids"], list(ids))
    theirs = load_file(tmp_path / "cond.safetensors")["cond"]
    mine = ours.encode(prompt).embeds[:, : len(ids)].float()
    assert theirs.shape == mine.shape == (1, len(ids), 3 * config.hidden_size), (theirs.shape, mine.shape)
    err = ((mine - theirs).norm() / theirs.norm()).item()
    assert err < TEXT_TOLERANCE, err
    return err, info


_CONVERTER_CHECK = """
import inspect, sys
try:
    from transformers.integrations.mistral import MistralConverter
except ImportError:
    from transformers.models.pixtral.convert_pixtral_weights_to_hf import MistralConverter
sys.exit(0 if "vocab" in inspect.signature(MistralConverter.__init__).parameters else 1)
"""


@pytest.fixture(scope="module")
def comfyui_builds_mistral_tokenizers():
    """ComfyUI 0.29 builds FLUX.2 [dev]'s Mistral tokenizer with ``MistralConverter(vocab=...)``, which
    transformers 5.15 replaced by a vocabulary-file argument (fixed in later ComfyUI, Comfy-Org/ComfyUI#15503):
    with such a transformers its own text-encoder loader fails on every FLUX.2 [dev] file, ours or BFL's, before
    reading a weight. Skip (naming the fix) rather than fail on ComfyUI's own bug; DEVELOPERS.md says how to run
    these tests (transformers < 5.15 in ComfyUI's venv)."""
    python = comfyui_python(comfyui_path())
    if subprocess.run([python, "-c", _CONVERTER_CHECK], capture_output=True, timeout=120).returncode:
        pytest.skip("this ComfyUI cannot build a Mistral tokenizer with the transformers in its venv "
                    "(MistralConverter takes a vocabulary file since transformers 5.15; Comfy-Org/ComfyUI#15503): "
                    "install transformers<5.15 there to run this test")


@pytest.mark.usefixtures("comfyui_builds_mistral_tokenizers")
def test_comfyui_text_encoder_loader_reads_a_file_flux2kit_quantize_wrote(quantized_mistral, tmp_path):
    """``flux2kit quantize`` of a Mistral-Small-3 folder, loaded by ComfyUI's own text-encoder loader
    (comfy.sd.load_clip with CLIPType.FLUX2, what Load CLIP with type flux2 calls) and encoded as CLIP Text Encode
    does: ComfyUI places every tensor, keeps the FP8 layers FP8, tokenizes with the tekken inside the file to our
    tokens and gives our embeddings.

    Why not the unmodified loader: ComfyUI tells text encoders apart by their real widths (comfy/sd.py
    detect_te_model: post_attention_layernorm 5120 wide is Mistral-Small-3 24B; a 128-wide one reads as
    LLAMA3_8) and builds the 24B sizes (Mistral3Small24BConfig), so no small file loads there as FLUX.2's
    encoder, and a 24B one is no test fixture. The probe changes exactly those two: detect_te_model answers
    MISTRAL3_24B, and the sizes come through ComfyUI's own option for them (``mistral3_24b_model_config``).
    """
    config, path = quantized_mistral
    # no digits: ComfyUI builds the tokenizer from the tekken.json inside the file, whose pattern splits numbers
    # into single digits; the tiny Hugging Face tokenizer the file was made from merges " 1" (the real
    # tokenizer.json and tekken.json agree, the tiny pair does not)
    err, info = check_comfyui_reads_our_text_encoder(tmp_path, path, config,
                                                     "A red fox sitting in a snowy forest, café — 你好")
    print(f"ComfyUI vs flux2kit on the quantized text encoder: relative error {err:.2e}")
    assert info["by_width"] == "TEModel.LLAMA3_8"  # what the unmodified loader takes this file for


@pytest.mark.usefixtures("comfyui_builds_mistral_tokenizers")
def test_text_encoder_check_catches_fp8_layers_unmarked(quantized_mistral, tmp_path):
    """Mutation: the FP8 file without what marks its FP8 layers (no comfy_quant tensors, no header entry): ComfyUI
    then takes the FP8 numbers as plain weights and drops the scales, and the check above fails."""
    config, path = quantized_mistral
    bare = tmp_path / "unmarked_fp8.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.endswith(".comfy_quant")}, bare,
              metadata={k: v for k, v in read_metadata(path).items() if k != "_quantization_metadata"})
    with pytest.raises(AssertionError):
        check_comfyui_reads_our_text_encoder(tmp_path, bare, config, "A red fox sitting in a snowy forest")


def read_metadata(path) -> dict:
    from flux2kit.pipelines.files.safetensors import read_header

    return dict(read_header(path).metadata)


def test_comfyui_qwen_tokenizer_gives_comfyuis_klein_tokens(tmp_path):
    """A Qwen3 single file with ComfyUI's shipped tokenizer folder tokenizes exactly as ComfyUI's KleinTokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from flux2kit.pipelines.models.text_encoder import load_text_encoder as load_text_encoder_file
    from flux2kit.pipelines.demo_models.comfy_text_encoders import save_tiny_qwen3_comfy

    folder = comfyui_path() / "comfy" / "text_encoders" / "qwen25_tokenizer"
    if not (folder / "vocab.json").exists():
        pytest.skip("this ComfyUI checkout lacks comfy/text_encoders/qwen25_tokenizer")
    config = Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=28,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    save_tiny_qwen3_comfy(Qwen3ForCausalLM(config).eval(), str(tmp_path / "qwen_3_4b.safetensors"))
    enc = load_text_encoder_file(tmp_path / "qwen_3_4b.safetensors", tokenizer=str(folder))
    prompt = "A red fox sitting in a snowy forest, café, 1234"
    from flux2kit.pipelines.models.text_encoder import qwen3_chat_texts

    ours = enc.tokenizer(qwen3_chat_texts(enc.tokenizer, [prompt]))["input_ids"][0]
    theirs = run_probe(tmp_path, "klein_tokens", prompt=prompt)["ids"]
    # ComfyUI pads to 512 with <|endoftext|> (151643); the tokens before the padding are the prompt's
    assert theirs[: len(ours)] == ours
    assert set(theirs[len(ours):]) <= {151643}
    assert enc.encode(prompt).embeds.shape == (1, 512, 3 * 32)


def test_save_fp8_node_in_comfyui_then_core_loader_and_model_save(comfyui, bf16_transformer):
    """Through /prompt: our Save FP8 node writes the file; ComfyUI's UNETLoader loads it and ModelSave writes it back.

    ComfyUI's own save of the loaded model must hold the same FP8 layers (weight, weight_scale,
    comfy_quant), bit for bit: the file is in the format ComfyUI itself writes.
    """
    import shutil

    name = "flux2kit_test_tiny_bf16.safetensors"
    src = comfyui.models / "diffusion_models" / name
    shutil.copy(bf16_transformer, src)
    out_name = "flux2kit_test_tiny_fp8mixed.safetensors"
    # the first diffusion_models folder ComfyUI knows: models/unet (its legacy name) under the server's base
    # directory (the harness's own, --base-directory) or, in older harness layouts, the checkout
    candidates = [base / "models" / sub / out_name for base in (comfyui.root, comfyui.comfyui)
                  for sub in ("unet", "diffusion_models")]
    candidates.append(comfyui.models / "diffusion_models" / out_name)
    try:
        run = comfyui.run({"1": {"class_type": "Flux2KitSaveFP8",
                                 "inputs": {"model_name": name, "filename": out_name, "overwrite": True}}})
        assert run.ok, run.describe()
        written = next(p for p in candidates if p.exists())
        mark = len(comfyui.log())
        run = comfyui.run({
            "2": {"class_type": "UNETLoader", "inputs": {"unet_name": out_name, "weight_dtype": "default"}},
            "3": {"class_type": "ModelSave", "inputs": {"model": ["2", 0], "filename_prefix": "flux2kit_roundtrip"}},
        })
        assert run.ok, run.describe()
        # ComfyUI's UNETLoader placed every key of our file (it only logs the ones it could not: "unet unexpected")
        assert unexpected_lines(comfyui.log()[mark:]) == [], comfyui.log()[mark:][-4000:]
        resaved = next(comfyui.output_dir.glob("flux2kit_roundtrip*.safetensors"))

        ours, theirs = load_file(written), load_file(resaved)
        # ComfyUI names RMSNorm weights .weight where BFL's files say .scale, and stores the unquantized
        # tensors in its load dtype (fp32 on CPU); everything else is the same tensor
        rename = lambda k: k[: -len(".scale")] + ".weight" if k.endswith(".scale") else k  # noqa: E731
        assert {rename(k) for k in ours} == set(theirs)
        quantized = [k for k in ours if k.endswith((".weight", ".weight_scale", ".comfy_quant"))
                     and ours[k].dtype in (torch.float8_e4m3fn, torch.uint8, torch.float32)]
        assert len([k for k in quantized if k.endswith(".comfy_quant")]) == 20
        for k in ours:
            x, y = ours[k], theirs[rename(k)]
            if k in quantized:  # FP8 weights, scales and comfy_quant: bit for bit ComfyUI's own layout
                assert x.dtype == y.dtype and x.shape == y.shape, k
                assert torch.equal(x.view(torch.uint8) if x.element_size() == 1 else x,
                                   y.view(torch.uint8) if y.element_size() == 1 else y), k
            else:
                assert torch.equal(x.float(), y.float()), k
        info = json.loads(theirs[quantized[0].rsplit(".", 1)[0] + ".comfy_quant"].numpy().tobytes())
        assert info == {"format": "float8_e4m3fn"}
    finally:
        src.unlink(missing_ok=True)
        for p in candidates:
            p.unlink(missing_ok=True)


def test_klein_workflow_with_qwen3_single_file_uses_comfyuis_tokenizer(comfyui):
    """Inside ComfyUI, a Qwen3 single file (FP8, no tokenizer inside) loads with the tokenizer ComfyUI ships, and a
    [klein] transformer quantized on load generates with it: the whole text-to-image workflow runs."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from flux2kit.pipelines.demo_models.comfy_text_encoders import save_tiny_qwen3_comfy
    from flux2kit.pipelines.demo_models.transformer import KLEIN_TEXT_WIDTHS, build_tiny_klein, save_transformer

    if not (comfyui.comfyui / "comfy" / "text_encoders" / "qwen25_tokenizer" / "vocab.json").exists():
        pytest.skip("this ComfyUI checkout lacks comfy/text_encoders/qwen25_tokenizer")
    hidden = KLEIN_TEXT_WIDTHS["4b"] // 3
    config = Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=28,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    te = comfyui.models / "text_encoders" / "qwen_3_4b_flux2kit_test_fp8.safetensors"
    tr = comfyui.models / "diffusion_models" / "flux2kit_test_klein_bf16.safetensors"
    save_tiny_qwen3_comfy(Qwen3ForCausalLM(config).eval(), str(te), fp8=True)
    save_transformer(build_tiny_klein(seed=0), str(tr), "bfl", is_distilled=True)
    try:
        workflow = json.loads((REPO / "workflows" / "api" / "text_to_image.json").read_text())
        for node in workflow.values():
            inputs = node["inputs"]
            if node["class_type"] == "Flux2KitTransformerLoader":
                inputs.update(model_name=tr.name, weight_mode="fp8 quantize on load")
            elif node["class_type"] == "Flux2KitTextEncoderLoader":
                inputs.update(text_encoder_name=te.name, weight_mode="fp8 as stored")
            elif node["class_type"] == "Flux2KitVAELoader":
                inputs["vae_name"] = comfyui.model_names["vae"]
            elif node["class_type"] == "Flux2KitSampler":
                inputs.update(num_inference_steps=2, width=64, height=64, seed=7)
        run = comfyui.run(workflow)
        assert run.ok, run.describe()
        # (without ComfyUI's folder the Qwen3 file, which holds no tokenizer, fails to load: see test_text_encoder_files)
        assert len(run.images()) == 1, run.describe()
    finally:
        te.unlink(missing_ok=True)
        tr.unlink(missing_ok=True)
