"""The YAML presets, shipped as package data (`self_healing.presets`)."""
