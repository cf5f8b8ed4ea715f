"""Prompt builders: exact HEX colour palettes and structured JSON prompts (Black Forest Labs' schema)."""
