"""The softpage exception hierarchy.

The library raises only these (plus ``OSError`` from the binding layer, which
carries errno and the domain or PFN involved). Only the CLI layer turns them
into messages and exit codes.
"""


class SoftpageError(Exception):
    """Base of every error softpage raises on purpose."""


class BitmapError(ValueError, SoftpageError):
    """A guest-published bitmap page set is malformed, torn or lying."""


class StreamError(SoftpageError):
    """A migration stream is malformed (expected X, got Y)."""


class GuestProtocolError(SoftpageError):
    """The guest did not follow the xenstore/suspend protocol."""


class BackendError(SoftpageError):
    """The hypervisor or simulator could not do what the driver asked."""


class MigrationError(SoftpageError):
    """The migration failed; the guest was left running on the source."""


class PlannerError(SoftpageError):
    """The round planner was asked something that breaks its invariants."""
