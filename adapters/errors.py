"""Domain errors about adapters. The gRPC layer maps each to one status code (server/errors.py)."""

CLIP_CHARS = 64


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """A short, printable form of client input for an error message or a log line: at most
    ``limit`` characters of its repr, so no message echoes a megabyte or a control character."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


class AdapterError(Exception):
    """Base class for adapter errors."""


class AdapterNotFound(AdapterError):
    pass


class AdapterExists(AdapterError):
    pass


class AdapterPathDenied(AdapterError):
    pass


class AdapterInvalid(AdapterError):
    """The adapter cannot be served: bad config, unsupported feature, or bad weights."""


class RegistryFull(AdapterError):
    """--max-registered-adapters is reached."""


class AdapterNoRoom(AdapterError):
    """Keeping the adapter resident would leave device pages too few for the others."""


class SavedModulesFull(AdapterNoRoom):
    """The adapter's fully trained modules would pass --max-saved-modules."""


class AdapterLoadFailed(AdapterError):
    """An internal fault while reading or copying an adapter (not the adapter's own fault)."""


class AdapterLoadTimeout(AdapterLoadFailed):
    """A disk read ran past --adapter-read-timeout."""
