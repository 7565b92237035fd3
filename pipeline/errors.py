"""Errors a user can act on. The CLI prints their message (no traceback) and exits with code 2."""


class PipelineError(Exception):
    """Base class: something the user must fix; the message says what and where."""


class ConfigError(PipelineError):
    """A config key is unknown, has the wrong type or an invalid value."""


class InputError(PipelineError):
    """An input folder, image, mask or label file is missing or unusable."""


class WeightsNotFoundError(PipelineError):
    """Model weights were not found where the config says or where torch.hub caches them."""


class CacheCorruptError(PipelineError):
    """A cached artifact is unreadable or inconsistent with its manifest."""


class WeightsMismatchError(PipelineError):
    """A weights file does not fit the model: missing, unexpected or misshapen keys."""


class StorageError(PipelineError):
    """The disk is full (or a quota is reached) while writing results."""


class StoppedWithRankZero(PipelineError):
    """Under torchrun, rank 0 reported an error (bad config, a missing file) and the other ranks stop with
    it; the CLI prints it once, on rank 0."""
