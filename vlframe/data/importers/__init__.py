"""Importers of public region-feature, caption and task-annotation formats into vlframe's stores.

Each module in :data:`CLI_MODULES` defines ``register_cli(subparsers)`` for
``tools/prepare_data.py`` next to plain-Python functions that do the work. The shared error type
and skip policy live in :mod:`.common`.
"""
from vlframe.data.importers.common import DataFormatError, ImportReport

# Modules whose register_cli adds subcommands to tools/prepare_data.py, in --help order (the one
# list: the README's command list is checked against it by tests/test_errors_that_help.py).
CLI_MODULES = (
    "vlframe.data.synthetic",  # synthetic
    "vlframe.data.importers.features",  # tsv_features, uniter_img_db, uniter_npz
    "vlframe.data.importers.uniter_txt",  # uniter_txt_db
    "vlframe.data.importers.captions",  # coco_karpathy, flickr30k_karpathy
    "vlframe.data.importers.tasks",  # vqa, nlvr2, snli_ve, refcoco, vcr
)

__all__ = ["CLI_MODULES", "DataFormatError", "ImportReport"]
