"""What is on disk: safetensors files, checkpoint layouts, FP8 storage, tokenizers, quantizing and saving.

Nothing here builds a torch model; ``models`` builds models from what these modules read.
"""
