"""Save: PNG, WebP or JPEG into ComfyUI's output folder, with the prompt and workflow embedded.

PNG and WebP carry the metadata exactly as ComfyUI's own savers write it (PNG tEXt chunks as in
Save Image, WebP EXIF as in Save Animated WEBP), so dropping a saved file on the ComfyUI canvas
reloads its graph; the frontend reads PNG, WebP and AVIF only. JPEG carries the same EXIF tags for
other tools, within JPEG's 64 KB EXIF limit.
"""

from __future__ import annotations

import json
import os

import numpy as np
from comfy_api.latest import io
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import folder_paths

from ..pipelines.errors import Flux2KitError
from ..pipelines.parameters import OUTPUT_FORMATS
from . import services
from .types import CATEGORY

EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
PNG_COMPRESS_LEVEL = 4  # ComfyUI's Save Image
WEBP_METHOD = 4  # libwebp's default effort; ComfyUI's "default"
WEBP_LOSSLESS_EFFORT = 75  # cwebp's default; 100 takes twice as long for <1% smaller files
PROMPT_TAG = 0x0110  # EXIF Model: "prompt:<json>" (ComfyUI's WebP scheme)
FIRST_EXTRA_TAG = 0x010F  # EXIF Make: "workflow:<json>", further extra_pnginfo keys at 0x010E, 0x010D, ...
JPEG_MAX_EXIF = 65533  # one APP1 segment; Pillow refuses more
SECRET_MARKERS = ("api_key", "apikey", "auth_token")
MIN_SECRET_LENGTH = 8  # shorter values go with their key but are not searched for elsewhere


# -- metadata --------------------------------------------------------------------------------------

def metadata_disabled() -> bool:
    """ComfyUI's --disable-metadata."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return False
    return bool(getattr(args, "disable_metadata", False))


def _is_secret_name(name) -> bool:
    name = str(name).lower().replace("-", "_")
    return any(marker in name for marker in SECRET_MARKERS)


def _strip_secret_keys(value, found: set[str]):
    """A copy of ``value`` without dict keys that name a secret; their string values go into ``found``."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if _is_secret_name(k):
                if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH:
                    found.add(v)
                continue
            out[k] = _strip_secret_keys(v, found)
        return out
    if isinstance(value, list | tuple):
        return [_strip_secret_keys(v, found) for v in value]
    return value


def _blank_secret_values(value, secrets: set[str]):
    """A copy of ``value`` with every occurrence of a secret string removed (positions kept)."""
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, "")
        return value
    if isinstance(value, dict):
        return {k: _blank_secret_values(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_blank_secret_values(v, secrets) for v in value]
    return value


def scrub_secrets(prompt, extra_pnginfo):
    """(prompt, extra_pnginfo) safe to embed: no key named like an API key or token, nor its value elsewhere.

    Secrets never belong in image metadata. The prompt's api_key/auth_token inputs are dropped, and
    their values are blanked wherever they appear (the UI workflow keeps widget values by position).
    """
    secrets: set[str] = set()
    prompt = _strip_secret_keys(prompt, secrets)
    extra = _strip_secret_keys(extra_pnginfo, secrets)
    if secrets:
        prompt, extra = _blank_secret_values(prompt, secrets), _blank_secret_values(extra, secrets)
    return prompt, extra


def metadata_texts(prompt, extra_pnginfo) -> list[tuple[str, str]]:
    """[(key, json)] in ComfyUI's order: "prompt", then each extra_pnginfo key (e.g. "workflow")."""
    if metadata_disabled():
        return []
    prompt, extra = scrub_secrets(prompt, extra_pnginfo)
    texts = [("prompt", json.dumps(prompt))] if prompt is not None else []
    texts += [(str(k), json.dumps(v)) for k, v in (extra or {}).items()]
    return texts


def png_info(texts) -> PngInfo | None:
    if not texts:
        return None
    info = PngInfo()
    for key, text in texts:
        info.add_text(key, text)
    return info


def exif_for(texts) -> bytes:
    """ComfyUI's WebP EXIF: "prompt:<json>" at 0x0110, the other keys from 0x010F downwards (b"" if none)."""
    if not texts:
        return b""
    exif = Image.Exif()
    tag = FIRST_EXTRA_TAG
    for key, text in texts:
        if key == "prompt":
            exif[PROMPT_TAG] = f"prompt:{text}"
        else:
            exif[tag] = f"{key}:{text}"
            tag -= 1
    return exif.tobytes()


def jpeg_exif(texts, node_id=None) -> bytes:
    """The WebP tags, within one JPEG APP1 segment: drop the workflow first, then the prompt."""
    exif = exif_for(texts)
    if len(exif) <= JPEG_MAX_EXIF:
        return exif
    prompt_only = [(k, t) for k, t in texts if k == "prompt"]
    dropped = [k for k, _ in texts if k != "prompt"]
    exif = exif_for(prompt_only)
    kept = "the prompt"
    if not prompt_only or len(exif) > JPEG_MAX_EXIF:
        exif, kept, dropped = b"", "no metadata", [k for k, _ in texts]
    note = (f"JPEG: {', '.join(dropped)} too large for JPEG's 64 KB EXIF; saved {kept}. "
            "Use png or webp to keep the workflow in the image.")
    services.log.warning(note)
    services.show_text(node_id, note)
    return exif


# -- files -----------------------------------------------------------------------------------------

def to_pil(image) -> Image.Image:
    """One IMAGE (H, W, C) in 0..1 to 8-bit PIL, as ComfyUI's savers convert it."""
    array = np.clip(255.0 * image.float().cpu().numpy(), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def _flatten(img: Image.Image) -> Image.Image:
    """JPEG has no alpha: composite onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def write_image(img: Image.Image, path: str, output_format: str, quality: int, texts, exif) -> None:
    if output_format == "png":
        img.save(path, pnginfo=png_info(texts), compress_level=PNG_COMPRESS_LEVEL)
    elif output_format == "webp":
        # 100 = lossless: the exact pixels, usually smaller than PNG (quality is then the encoder's effort)
        lossless = quality >= 100
        img.save(path, format="WEBP", exif=exif, lossless=lossless, method=WEBP_METHOD,
                 quality=WEBP_LOSSLESS_EFFORT if lossless else quality)
    else:
        # full colour resolution (4:4:4) at high quality; 4:2:0 below, as most encoders do
        img = _flatten(img)
        img.save(path, format="JPEG", exif=exif, quality=quality, subsampling=0 if quality >= 90 else 2)


def save_images(images, filename_prefix: str, output_format: str, quality: int, prompt=None, extra_pnginfo=None,
                node_id=None) -> list[dict]:
    """Write each image of the batch; returns ComfyUI's ui entries {"filename", "subfolder", "type"}."""
    if images is None or len(images) == 0:
        return []
    if output_format not in OUTPUT_FORMATS:
        raise Flux2KitError(f"Unknown output_format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}.")
    height, width = images[0].shape[0], images[0].shape[1]
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        filename_prefix, folder_paths.get_output_directory(), width, height)
    texts = metadata_texts(prompt, extra_pnginfo)
    exif = b""
    if output_format == "webp":
        exif = exif_for(texts)
    elif output_format == "jpeg":
        exif = jpeg_exif(texts, node_id)
    ext = EXTENSIONS[output_format]
    results = []
    for batch_number, image in enumerate(images):
        name = filename.replace("%batch_num%", str(batch_number))
        file = f"{name}_{counter:05}_.{ext}"
        # ComfyUI's counter does not see files named with %batch_num%; never overwrite one
        while os.path.exists(os.path.join(folder, file)):
            counter += 1
            file = f"{name}_{counter:05}_.{ext}"
        write_image(to_pil(image), os.path.join(folder, file), output_format, quality, texts, exif)
        results.append({"filename": file, "subfolder": subfolder, "type": "output"})
        counter += 1
    return results


# -- node ------------------------------------------------------------------------------------------

class SaveImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Flux2KitSaveImage",
            display_name="FLUX.2 Save Image (flux2kit)",
            category=CATEGORY,
            description="Saves images to ComfyUI's output folder as PNG, WebP or JPEG. PNG and WebP embed the "
                        "prompt and workflow like ComfyUI's Save Image (drop the file on the canvas to reload the "
                        "graph); JPEG keeps the prompt in its EXIF (the workflow too, if it fits in 64 KB).",
            inputs=[
                io.Image.Input("images", tooltip="The images to save; each image of a batch becomes one file."),
                io.String.Input("filename_prefix", default="flux2kit/FLUX2",
                                tooltip="File name prefix, relative to the output folder; '/' makes sub-folders. "
                                        "Accepts %year% %month% %day% %hour% %minute% %second% %width% %height% "
                                        "and %batch_num%. Files are named <prefix>_00001_.png and so on; the "
                                        "counter continues across runs and formats."),
                io.Combo.Input("output_format", options=list(OUTPUT_FORMATS), default="png",
                               tooltip="png: lossless, biggest. webp: much smaller; ComfyUI still reloads the "
                                       "workflow from it. jpeg: widest support; ComfyUI does not reload workflows "
                                       "from JPEG."),
                io.Int.Input("output_quality", default=90, min=0, max=100,
                             tooltip="Compression quality for webp and jpeg (higher = better and bigger); ignored "
                                     "for png. webp at 100 is lossless."),
            ],
            outputs=[io.Image.Output(display_name="images",
                                     tooltip="The same images, passed through, so saving can sit mid-chain.")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo, io.Hidden.unique_id],
            is_output_node=True,
            search_aliases=["save", "save image", "export", "webp", "jpeg", "jpg", "png"],
        )

    @classmethod
    def execute(cls, images, filename_prefix, output_format, output_quality) -> io.NodeOutput:
        hidden = cls.hidden
        results = save_images(images, filename_prefix, output_format, output_quality,
                              prompt=hidden.prompt if hidden else None,
                              extra_pnginfo=hidden.extra_pnginfo if hidden else None,
                              node_id=hidden.unique_id if hidden else None)
        return io.NodeOutput(images, ui={"images": results})


NODES = [SaveImage]
