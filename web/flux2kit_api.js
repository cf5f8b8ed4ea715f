// flux2kit API keys in ComfyUI's settings (Settings > flux2kit > API keys).
// ComfyUI stores settings in the user's comfy.settings.json (user/default/ on the server); the
// FLUX.2 API Generate node reads the key from there when the environment variable (BFL_API_KEY,
// OXEN_API_KEY) is not set. A setting is not a node input, so the key never enters a workflow,
// a queued prompt or an image's metadata. Multi-user ComfyUI: the node cannot tell which user
// queued a prompt, so it reads environment variables only.
import { app } from "../../scripts/app.js";

const KEY_NOTE = " Stored in ComfyUI's user settings file (comfy.settings.json) on the server, readable by anyone " +
  "who can open this ComfyUI; the environment variable takes precedence. Never saved in workflows or images.";

app.registerExtension({
  name: "flux2kit.api",
  settings: [
    {
      id: "Flux2Kit.API.BFLKey",
      category: ["flux2kit", "API keys", "Black Forest Labs"],
      name: "Black Forest Labs API key (FLUX.2 API Generate)",
      tooltip: "Key from dashboard.bfl.ai, used when BFL_API_KEY is not set." + KEY_NOTE,
      type: "text",
      defaultValue: "",
      attrs: { type: "password", autocomplete: "off" },
    },
    {
      id: "Flux2Kit.API.OxenKey",
      category: ["flux2kit", "API keys", "Oxen.ai"],
      name: "Oxen.ai API key (FLUX.2 API Generate)",
      tooltip: "Key from oxen.ai, used when OXEN_API_KEY is not set." + KEY_NOTE,
      type: "text",
      defaultValue: "",
      attrs: { type: "password", autocomplete: "off" },
    },
  ],
});
