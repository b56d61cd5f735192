"""Metrics (registered in METRICS): accuracy, loss average, mean, OT distance, retrieval recall@K."""
from vlframe.metrics import alignment, classification, downstream, retrieval  # noqa: F401  (register into METRICS)
from vlframe.metrics.average import Average  # noqa: F401
from vlframe.metrics.base import DatasetMetric, Metric  # noqa: F401
from vlframe.metrics.retrieval import retrieval_recall  # noqa: F401
