"""Exception types, one per kind of failure a user can cause, each with a message naming the culprit."""

from __future__ import annotations


class MammoError(Exception):
    """Base class for every error this package raises on purpose."""


class ImageReadError(MammoError):
    """A file or upload is not an image this tool can read (empty, truncated, wrong format, too big...)."""


class DatasetError(MammoError):
    """A dataset folder does not have the expected layout or holds unreadable files."""


class ModelDirError(MammoError):
    """A model directory is missing, incomplete, corrupted or does not match its card."""


class TrainingBusyError(MammoError):
    """Another training run holds the training lock."""
