"""``gradproj.diffusers``: the protected weights of diffusers models (see
:mod:`gradproj.integrations.diffusers`). Importing this module does not import diffusers."""

from gradproj.integrations.diffusers import TARGETS, protect, text_readers

__all__ = ["TARGETS", "protect", "text_readers"]
