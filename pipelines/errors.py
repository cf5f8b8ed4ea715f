"""Errors a user can fix. Each message names the problem and the fix."""


class Flux2KitError(ValueError):
    """A problem with the user's input or files; the message says what to do."""


class UnsupportedFormatError(Flux2KitError):
    """A file in a format flux2kit recognises but does not load (yet)."""
