"""Helpers for the tests and the benchmarks (``flux2kit.testing``); never imported by ``pipelines/`` or ``nodes/``.

- ``fake_comfyui``: a server process speaking ComfyUI's HTTP and websocket protocol that runs flux2kit's
  real nodes on the tiny demo models (``flux2kit run --server`` and ``flux2kit batch`` tests, the batch benchmark).
- ``hosted_api``: a local stand-in for the hosted FLUX.2 APIs (Black Forest Labs, Oxen.ai).
- ``real_comfyui``: starts a real ComfyUI (``COMFYUI_PATH``) with this pack and talks to it through the
  one client (``cli.comfy_client``); the ``comfyui`` fixture in tests/conftest.py uses it.
- ``upsampling``: the references for prompt upsampling (diffusers' ``upsample_prompt``, transformers' ``PixtralProcessor``).
- ``lora_reference``: the references for LoRAs (diffusers' checkpoint converter on merged weights, its
  ``load_lora_weights`` on a bare transformer) and fixed transformer inputs.
- ``pictures``: deterministic test pictures.
"""
