"""Data: raw sources (digits, tiny, MNIST, CIFAR-10) and the pretraining / finetuning tasks built from them."""

from msif.data.sources import Source, load_source
from msif.data.tasks import Examples, Tasks, build_tasks

__all__ = ["Examples", "Source", "Tasks", "build_tasks", "load_source"]
