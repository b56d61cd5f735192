"""The model contract every V+L encoder implements for tasks (see :mod:`vlframe.models.contract`)."""
from vlframe.models.contract import TIE_TARGETS, VLEncoder, VLEncoderOutput, VLEncoderSpec  # noqa: F401
