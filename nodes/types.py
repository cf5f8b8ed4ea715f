"""The pack's own socket types. Their names are public API: saved workflows refer to them."""

from comfy_api.latest import io

Transformer = io.Custom("FLUX2KIT_TRANSFORMER")
TextEncoder = io.Custom("FLUX2KIT_TEXT_ENCODER")
VAE = io.Custom("FLUX2KIT_VAE")
Conditioning = io.Custom("FLUX2KIT_CONDITIONING")
References = io.Custom("FLUX2KIT_REFERENCES")
# Prompt builders
Palette = io.Custom("FLUX2KIT_PALETTE")
Subjects = io.Custom("FLUX2KIT_JSON_SUBJECTS")
TextElements = io.Custom("FLUX2KIT_JSON_TEXT_ELEMENTS")

CATEGORY = "flux2kit"
