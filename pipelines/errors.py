"""Errors a user can fix. Each message names the problem and the fix."""


class Flux2KitError(ValueError):
    """A problem with the user's input or files; the message says what to do."""


class UnsupportedFormatError(Flux2KitError):
    """A file in a format flux2kit recognises but does not load (yet)."""


def forget_locals(exc: BaseException) -> None:
    """Clear the local variables of the frames an exception's traceback holds.

    A failed load must not keep a half-built model alive through the traceback that ComfyUI keeps
    for its error report; the traceback text stays, the tensors go.
    """
    import traceback

    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        traceback.clear_frames(tb.tb_next)
