"""Domain errors about adapters. The gRPC layer maps each to one status code (server/errors.py)."""


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
