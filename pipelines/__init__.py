"""The flux2kit engine: loading, FP8, encoding, references, sampling, decoding.

Pure torch/diffusers/transformers; this package never imports ComfyUI.
"""
