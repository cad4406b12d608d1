"""lmedit's exceptions. Every error a user can cause is one of these, with a one-line message
that says what was wrong and what is accepted (never a traceback from deep inside torch)."""


class LmeditError(Exception):
    """Base class of all user-facing lmedit errors."""


class ModelLoadError(LmeditError):
    """A model source could not be resolved, found or loaded."""


class SpecError(LmeditError):
    """A model's structure (blocks, projections, norms) could not be discovered or overridden."""


class RequestError(LmeditError, ValueError):
    """An edit request (or an evaluation probe) is malformed."""


class PatchError(LmeditError):
    """A patch cannot be applied, reverted, saved or loaded (e.g. it belongs to another model)."""


class EditError(LmeditError):
    """An editing method failed; the model's weights were left exactly as they were."""


class DataError(LmeditError, ValueError):
    """A dataset file or record is malformed (the message names the file, record index and field)."""


class EvalError(LmeditError):
    """An evaluation run was misconfigured (bad protocol, existing results without resume …)."""
