"""Model roles, backends and loaders (DESIGN.md, "Models: roles, presets, backends")."""

from models.registry import BACKENDS, ROLES, ModelConfigError, load, normalize_spec

__all__ = ["BACKENDS", "ROLES", "ModelConfigError", "load", "normalize_spec"]
