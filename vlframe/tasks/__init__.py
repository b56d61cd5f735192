"""Tasks (registered in TASKS): what a batch is made into, head, loss, metric."""
from vlframe.tasks import downstream, pretrain  # noqa: F401
from vlframe.tasks.base import DataInfo, Task, TaskOutput  # noqa: F401
