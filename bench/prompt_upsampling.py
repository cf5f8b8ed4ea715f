"""Prompt upsampling: what the whole text encoder costs next to the layers FLUX.2 reads.

Memory: Mistral-Small-3.x built on the meta device from its published config (no weights), counted as
flux2kit loads it: the 30 layers FLUX.2 reads, the whole model, the whole model without the vision tower;
bf16, and with FP8 decoder linears (the LM head and the vision tower stay bf16). Time (tiny random model,
CPU): one encode through the trimmed encoder, one through the whole model's FLUX.2 view (the same layers,
so the same cost), and one upsampling of --tokens new tokens.

    python bench/prompt_upsampling.py            # memory table + timings (a minute or two on 2 cores)
    python bench/prompt_upsampling.py --quick    # fewer rounds and tokens
"""

from __future__ import annotations

import argparse
import re
import tempfile

import torch
from _common import Row, interleaved_times, machine_facts, ratio, table

GB = 1e9


def real_config():
    """Mistral-Small-3.1/3.2's published config (docs/checkpoints.md)."""
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    text = MistralConfig(vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
    vision = PixtralVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                 head_dim=64, patch_size=14, image_size=1540)
    return Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=2, projector_hidden_act="gelu",
                          multimodal_projector_bias=False, tie_word_embeddings=False)


def memory_rows() -> list[Row]:
    from transformers import Mistral3ForConditionalGeneration

    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(real_config())
    params = list(model.named_parameters())

    def layer(name):
        m = re.search(r"language_model\.layers\.(\d+)\.", name)
        return int(m.group(1)) if m else None

    def size(keep, fp8):
        return sum(p.numel() * (1 if fp8 and p.ndim == 2 and layer(n) is not None else 2) for n, p in params if keep(n))

    parts = {"FLUX.2 layers (30 + embedding)": lambda n: "embed_tokens" in n or (layer(n) or 0) < 30 and layer(n) is not None,
             "whole model": lambda n: True,
             "whole model, text only": lambda n: "vision_tower" not in n and "multi_modal_projector" not in n}
    rows = []
    for fp8 in (False, True):
        base = size(parts["FLUX.2 layers (30 + embedding)"], fp8)
        for name, keep in parts.items():
            value = size(keep, fp8)
            rows.append(Row(f"{name}, {'FP8 layers' if fp8 else 'bf16'}", f"{value / GB:.2f} GB (+{(value - base) / GB:.2f})",
                            ratio(value, base)))
    return rows


def timing_rows(runs: int, tokens: int) -> list[Row]:
    from flux2kit.pipelines.demo_models.text_encoder import build_tiny_mistral3, save_tiny_mistral3
    from flux2kit.pipelines.models.full_text_encoder import load_full_text_encoder
    from flux2kit.pipelines.models.text_encoder import load_text_encoder
    from flux2kit.pipelines.prompting.upsample import upsample_prompt

    with tempfile.TemporaryDirectory() as folder:
        save_tiny_mistral3(*build_tiny_mistral3(seed=0), folder)
        trimmed, full = load_text_encoder(folder), load_full_text_encoder(folder)
    prompt = "a red fox in the snow"
    times = interleaved_times({
        "encode, trimmed": lambda: trimmed.encode(prompt),
        "encode, whole model's view": lambda: full.encode(prompt),
        f"upsample, {tokens} new tokens": lambda: upsample_prompt(full, prompt, max_new_tokens=tokens),
    }, runs=runs)
    base = times.median("encode, trimmed")
    return [Row(name, times.summary(name), ratio(times.median(name), base)) for name in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tokens")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    runs, tokens = (2, 4) if args.quick else (args.runs, args.tokens)
    print(machine_facts() + "\n")
    print("Mistral-Small-3.x as loaded (ratio: to the FLUX.2 layers in the same precision)")
    print(table(memory_rows(), headers=("part", "size", "ratio", "")))
    print("\nTiny random Mistral 3 on the CPU (ratio: to one trimmed encode)")
    print(table(timing_rows(runs, tokens), headers=("call", "time", "ratio", "")))


if __name__ == "__main__":
    main()
