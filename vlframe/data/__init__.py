"""Data: batches, stores, token-budget sampling, loaders."""
from . import dataset  # noqa: F401  (registers DATASETS "image_text", "synthetic")
from . import downstream  # noqa: F401  (registers DATASETS "task_text", "synthetic_task")
from . import sampler  # noqa: F401  (registers SAMPLERS "token_budget")
from . import stores  # noqa: F401
from . import synthetic  # noqa: F401
