"""Data: batches, stores, token-budget sampling, loaders."""
from . import dataset  # noqa: F401  (registers DATASETS "image_text", "synthetic")
from . import sampler  # noqa: F401  (registers SAMPLERS "token_budget")
from . import stores  # noqa: F401
from . import synthetic  # noqa: F401
