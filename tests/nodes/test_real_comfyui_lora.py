"""LoRAs against a real ComfyUI (``COMFYUI_PATH``): core UNETLoader + LoraLoaderModelOnly give the same transformer
output as flux2kit on the same bf16 file and ComfyUI-format LoRAs; the LoRA workflow runs on the server; LoRA'd
variants share the base in ComfyUI's memory accounting.

ComfyUI's own Python (``COMFYUI_PYTHON``) runs a short script in a subprocess with ComfyUI's real node classes;
the result is compared with our engine here. Skipped without COMFYUI_PATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux2kit.testing.real_comfyui import REPO, comfyui_path, comfyui_python

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                       reason="set COMFYUI_PATH to a ComfyUI checkout to run the real-ComfyUI tests"),
]

# fp32 on both sides (ComfyUI computes LoRA patches in fp32 and keeps a bf16 file's weights fp32 on the CPU);
# what differs is summation order: ComfyUI merges W + s * delta, we add s * B(A x) next to W x. Measured <= 6e-7.
TOLERANCE = 1e-5

PROBE = textwrap.dedent('''
    import json, logging, os, sys
    comfy_root, task, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfy_root)
    os.chdir(comfy_root)
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    torch.set_grad_enabled(False)
    from safetensors.torch import load_file, save_file
    import folder_paths

    class Capture(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    capture = Capture()
    logging.getLogger().addHandler(capture)
    folder_paths.add_model_folder_path("diffusion_models", args["models"], is_default=True)
    folder_paths.add_model_folder_path("loras", args["loras_dir"], is_default=True)
    import comfy.model_management as mm
    if task == "lora_forward":
        import nodes
        model = nodes.UNETLoader().load_unet(args["model"], "default")[0]
        for name, strength in args["loras"]:
            model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]
        mm.load_models_gpu([model])
        dm = model.model.diffusion_model
        inp = load_file(args["inputs"])
        out = dm(inp["x"], inp["sigma"], inp["context"], guidance=inp["guidance"])
        save_file({"out": out.float().contiguous()}, args["out"])
        print(json.dumps({"dtype": str(dm.img_in.weight.dtype),
                          "not_loaded": [m for m in capture.messages if "not loaded" in m or "NOT LOADED" in m]}))
    elif task == "accounting":
        sys.path.insert(0, args["custom_nodes"])  # the test server's own custom_nodes: flux2kit -> this checkout
        import flux2kit
        from flux2kit.nodes.loaders import TransformerLoader
        from flux2kit.nodes.lora import LoraLoader
        base = TransformerLoader.execute(model_name=args["model"], weight_mode="fp8 as stored",
                                         offload_blocks=False).result[0]
        a = LoraLoader.execute(transformer=base, lora_name=args["lora"], strength=1.0).result[0]
        b = LoraLoader.execute(transformer=a, lora_name=args["lora"], strength=-0.5).result[0]
        holder = base.patcher.model
        loaded = []
        for p in (base.patcher, a.patcher, b.patcher, a.patcher):
            mm.load_models_gpu([p])
            loaded.append(sum(1 for m in mm.current_loaded_models if m.model is not None and m.model.model is holder))
        print(json.dumps({
            "flux2kit": os.path.realpath(flux2kit.__file__),
            "clones": [a.patcher.is_clone(base.patcher), b.patcher.is_clone(a.patcher)],
            "same_model": a.patcher.model is holder and b.patcher.model is holder,
            "parents": [a.patcher.parent is base.patcher, b.patcher.parent is base.patcher],
            "sizes": [base.patcher.model_size(), a.patcher.model_size(), b.patcher.model_size()],
            "lora_bytes": [a.nbytes, b.nbytes], "loaded": loaded,
            "shared_weights": a.model is base.model and b.base is base}))
''')


def run_probe(tmp_path, task: str, **args) -> dict:
    root = comfyui_path()
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([comfyui_python(root), str(script), str(root), task, json.dumps(args)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A bf16 BFL transformer file, LoRA files in ComfyUI's formats, fixed inputs."""
    from flux2kit.pipelines.demo_models import lora as demo
    from flux2kit.pipelines.demo_models.transformer import build_tiny_transformer, save_transformer

    root = tmp_path_factory.mktemp("real_lora")
    (root / "models").mkdir()
    (root / "loras").mkdir()
    base = build_tiny_transformer(seed=5)
    model = save_transformer(base, str(root / "models" / "tiny_bf16.safetensors"), "bfl")
    config = dict(base.config)
    shapes = demo.layer_shapes(config)
    loras = {}

    def put(name, sd):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "loras" / name))
        loras[name.removesuffix(".safetensors")] = name

    a = demo.random_lora(config, rank=4, seed=1, std=0.03)
    b = demo.random_lora(config, rank=8, seed=2, std=0.03)
    put("downup.safetensors", demo.lora_state_dict(a, "bfl-downup", alpha=2.0)[0])
    put("ab.safetensors", demo.lora_state_dict(a, "bfl", alpha=2.0)[0])
    put("kohya.safetensors", demo.lora_state_dict(b, "kohya", alpha=4.0)[0])
    lokr = {}
    for i, layer in enumerate(["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "img_in",
                               "final_layer.adaLN_modulation.1", "double_blocks.1.img_attn.proj"]):
        factors = demo.lokr_layer(shapes[layer], rank=None if layer.endswith("proj") else 4, seed=i)
        lokr.update({f"diffusion_model.{layer}.{k}": v for k, v in factors.items()})
        lokr[f"diffusion_model.{layer}.alpha"] = torch.tensor(2.0)
    put("lokr.safetensors", lokr)
    g = torch.Generator().manual_seed(3)
    for axis in ("in", "out"):
        layers = ["double_blocks.0.img_mlp.0", "double_blocks.1.txt_attn.qkv", "final_layer.adaLN_modulation.1"]
        sd = demo.lora_state_dict({k: a[k] for k in layers}, "bfl", alpha=2.0)[0]
        for layer in layers:
            o, i = shapes[layer]
            sd[f"diffusion_model.{layer}.dora_scale"] = torch.rand(*((1, i) if axis == "in" else (o, 1)), generator=g) + 0.5
        put(f"dora_{axis}.safetensors", sd)
    peft_sd, peft_meta = demo.lora_state_dict(a, "diffusers", alpha=8.0)
    save_file(peft_sd, str(root / "loras" / "peft.safetensors"), metadata={"format": "pt", **peft_meta})
    # the layers ComfyUI maps from diffusers names (not time_guidance_embed.*, not *_stream_modulation.linear)
    comfy_maps = {k: v for k, v in a.items() if not k.startswith(("time_in", "guidance_in", "double_stream", "single_stream"))}
    put("peft_comfyui_part.safetensors", demo.lora_state_dict(comfy_maps, "diffusers")[0])
    put("noprefix.safetensors", demo.lora_state_dict(a, "bfl-noprefix", alpha=2.0)[0])
    put("base_model.safetensors", demo.lora_state_dict(a, "bfl-base-model", alpha=2.0)[0])
    norm = {"final_layer.adaLN_modulation.1": a["final_layer.adaLN_modulation.1"]}
    for name, rows in (("norm_dora.safetensors", None), ("norm_dora_swapped.safetensors", "swap")):
        sd = demo.lora_state_dict(norm, "diffusers")[0]  # diffusers names: scale|shift rows
        magnitude = torch.linspace(0.5, 1.5, 512).reshape(512, 1)  # per row, different in the two halves
        sd["transformer.norm_out.linear.dora_scale"] = torch.cat(magnitude.chunk(2)[::-1]) if rows else magnitude
        put(name, sd)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 128, 4, 6, generator=g), torch.randn(1, 16, 384, generator=g)
    save_file({"x": x, "context": ctx, "sigma": torch.tensor([0.7]), "guidance": torch.tensor([4.0])},
              str(root / "in.safetensors"))
    return dict(root=root, model=model, loras=loras, x=x, ctx=ctx)


def ours(setup, loras) -> torch.Tensor:
    from flux2kit.pipelines.files.lora_formats import read_lora
    from flux2kit.pipelines.generation.sampling import latent_ids, pack, text_ids, unpack
    from flux2kit.pipelines.models.lora import LoraEntry, apply_loras
    from flux2kit.pipelines.models.transformer import load_transformer

    model = load_transformer(setup["model"], device="cpu", dtype=torch.float32)
    entries = [LoraEntry(read_lora(setup["root"] / "loras" / name), s) for name, s in loras]
    if entries:
        model = apply_loras(model, entries)
    with torch.no_grad():
        out = model(pack(setup["x"]), latent_ids(1, 4, 6), setup["ctx"], text_ids(1, 16), torch.tensor([0.7]),
                    torch.tensor([4.0]))
    return unpack(out, 4, 6)


def theirs(setup, tmp_path, loras) -> tuple[torch.Tensor, dict]:
    info = run_probe(tmp_path, "lora_forward", models=str(setup["root"] / "models"),
                     loras_dir=str(setup["root"] / "loras"), model="tiny_bf16.safetensors",
                     loras=[[name, s] for name, s in loras], inputs=str(setup["root"] / "in.safetensors"),
                     out=str(tmp_path / "out.safetensors"))
    return load_file(tmp_path / "out.safetensors")["out"], info


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = {
    "ComfyUI/BFL lora_down/up + alpha": [("downup.safetensors", 0.8)],
    "kohya + alpha": [("kohya.safetensors", 0.8)],
    "two stacked, 0.7 and -1.3": [("ab.safetensors", 0.7), ("kohya.safetensors", -1.3)],
    "LoKr (fused q|k|v, adaLN, whole factors)": [("lokr.safetensors", 0.6)],
    "DoRA dora_scale per column": [("dora_in.safetensors", 0.7)],
    "DoRA dora_scale per row": [("dora_out.safetensors", 1.0)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_core_lora_loader_gives_our_output(case, setup, tmp_path):
    loras = CASES[case]
    out, info = theirs(setup, tmp_path, loras)
    assert info["dtype"] == "torch.float32" and not info["not_loaded"], info
    mine = ours(setup, loras)
    err = rel(mine, out)
    print(f"{case}: relative difference to ComfyUI {err:.2e}")
    assert err < TOLERANCE, err
    assert rel(ours(setup, []), out) > 100 * TOLERANCE  # the LoRA changed ComfyUI's output for real


def test_comfyui_ignores_peft_alpha_and_flux2_time_modulation_names(setup, tmp_path):
    """ComfyUI on a diffusers-format LoRA: scale 1 whatever the adapter metadata says, and the time/guidance
    embedder and stream-modulation layers are "not loaded" (it maps them with FLUX.1's names). We apply what the
    file means (diffusers' reading); ComfyUI's result is ours on the layers it keeps at alpha/rank = 1."""
    out, info = theirs(setup, tmp_path, [("peft.safetensors", 1.0)])
    dropped = {m.rsplit(" ", 1)[-1].split(".lora_")[0] for m in info["not_loaded"]}
    assert {"transformer.time_guidance_embed.timestep_embedder.linear_1",
            "transformer.double_stream_modulation_img.linear",
            "transformer.single_stream_modulation.linear"} <= dropped, info["not_loaded"]
    assert rel(ours(setup, [("peft_comfyui_part.safetensors", 1.0)]), out) < TOLERANCE
    assert rel(ours(setup, [("peft.safetensors", 1.0)]), out) > 1000 * TOLERANCE


def test_comfyui_loads_nothing_from_bfl_names_without_prefix_or_with_base_model_model(setup, tmp_path):
    base_out = ours(setup, [])
    for name in ("noprefix.safetensors", "base_model.safetensors"):
        out, info = theirs(setup, tmp_path, [(name, 1.0)])
        assert len(info["not_loaded"]) == 31 * 3 and torch.equal(out, theirs(setup, tmp_path, [])[0])
        assert rel(ours(setup, [(name, 1.0)]), ours(setup, [("ab.safetensors", 1.0)])) < TOLERANCE  # we apply it
        assert rel(out, base_out) < TOLERANCE


def test_comfyui_swaps_norm_out_rows_but_not_their_dora_scale(setup, tmp_path):
    """A diffusers-named norm_out LoRA with a per-row dora_scale: ComfyUI swaps the delta into BFL's shift|scale
    order but leaves dora_scale in diffusers' order. Its output equals ours on the file with dora_scale's halves
    swapped, not ours on the file itself."""
    out, info = theirs(setup, tmp_path, [("norm_dora.safetensors", 1.0)])
    assert not info["not_loaded"]
    assert rel(ours(setup, [("norm_dora_swapped.safetensors", 1.0)]), out) < TOLERANCE
    assert rel(ours(setup, [("norm_dora.safetensors", 1.0)]), out) > 100 * TOLERANCE


def test_lora_workflow_runs_on_comfyui_and_strength_changes_rerun_only_the_lora(comfyui):
    workflow = json.loads((REPO / "workflows" / "api" / "lora_text_to_image.json").read_text())
    names = comfyui.model_names
    workflow["1"]["inputs"]["model_name"] = names["transformer"]
    workflow["2"]["inputs"]["text_encoder_name"] = names["text_encoder"]
    workflow["3"]["inputs"]["vae_name"] = names["vae"]
    workflow["5"]["inputs"].update(num_inference_steps=2, width=64, height=64, seed=7)
    for nid in ("9", "10"):
        workflow[nid]["inputs"]["lora_name"] = names["lora"]
    run = comfyui.run(workflow)
    assert run.ok, run.describe()
    assert len(run.images()) == 1
    first = comfyui.view(run.images()[0])
    workflow["9"]["inputs"]["strength"] = 0.25
    run = comfyui.run(workflow)
    assert run.ok, run.describe()
    assert {"1", "2", "3", "4"} <= run.cached and not {"9", "10", "5"} & run.cached
    assert comfyui.view(run.images()[0]) != first
    flux1 = comfyui.models / "loras" / "flux1_test_lora.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight": torch.zeros(4, 256),
               "diffusion_model.double_blocks.0.img_mod.lin.lora_B.weight": torch.zeros(1536, 4)}, str(flux1))
    try:
        workflow["9"]["inputs"]["lora_name"] = flux1.name
        run = comfyui.run(workflow)
        assert not run.ok and run.error["node_id"] == "9"
        assert "flux1_test_lora.safetensors is a LoRA for FLUX.1" in run.error["exception_message"]
    finally:
        flux1.unlink()
    workflow["9"]["inputs"]["lora_name"] = names["lora"]
    workflow["5"]["inputs"]["seed"] = 8
    assert comfyui.run(workflow).ok  # ComfyUI keeps running, the loaded transformer unharmed


def test_lora_variants_share_the_base_in_comfyuis_memory_accounting(setup, tmp_path, comfyui):
    import shutil

    from flux2kit.pipelines.demo_models import lora as demo

    lora = demo.random_lora(_tiny_config(), rank=4, seed=9)
    demo.save_lora(lora, str(setup["root"] / "loras" / "acct.safetensors"), "bfl", alpha=4.0)
    shutil.copy(setup["model"], setup["root"] / "models" / "acct_base.safetensors")
    info = run_probe(tmp_path, "accounting", models=str(setup["root"] / "models"), loras_dir=str(setup["root"] / "loras"),
                     model="acct_base.safetensors", lora="acct.safetensors", custom_nodes=str(comfyui.root / "custom_nodes"))
    assert info["flux2kit"].startswith(str(REPO))  # this checkout's nodes ran
    assert info["clones"] == [True, True] and info["same_model"] and info["parents"] == [True, True]
    assert info["shared_weights"]
    base, a, b = info["sizes"]
    assert a == base + info["lora_bytes"][0] and b == base + info["lora_bytes"][1]  # the base counted once
    assert info["loaded"] == [1, 1, 1, 1]  # loading a variant replaces the other's entry (is_clone), never adds


def _tiny_config():
    from flux2kit.pipelines.demo_models.transformer import tiny_transformer_config

    return tiny_transformer_config()
