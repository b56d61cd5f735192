"""Metrics: averages over a validation pass, retrieval recall@K (VQA score etc. join here)."""
from vlframe.metrics import average, retrieval  # noqa: F401
from vlframe.metrics.average import Average  # noqa: F401
from vlframe.metrics.retrieval import retrieval_recall  # noqa: F401
