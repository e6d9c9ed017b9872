"""Exceptions that tether raises to its users."""


class TetherError(Exception):
    """Base class of tether's own errors."""


class ConstraintError(TetherError, ValueError):
    """A constraint spec (JSON Schema, regex, grammar, ...) is invalid or unsupported.

    Raised at compile time, before anything is generated. It subclasses ``ValueError`` so that
    vLLM's request validation turns it into an HTTP 400 in the server.
    """
