"""The torch models: the FLUX.2 transformer, the text encoders, the VAE, FP8 layers and block offload.

Each is built on the meta device and filled from ``files`` one tensor at a time.
"""
