"""The stages users run. Each is a `msif.lifecycle.Stage` driven by `msif.lifecycle.run`, with a plain function
of a composed config that tests and the Python API call directly; the `msif` command (msif/cli.py) is a thin Hydra
wrapper around them."""

from msif.stages.cleanse import cleanse
from msif.stages.faults import planted_faults
from msif.stages.finetune import finetune, finetuned
from msif.stages.influence import influence
from msif.stages.pretrain import pretrain, pretrained
from msif.stages.validate_lds import validate_lds
from msif.stages.validate_loo import validate_loo

__all__ = [
    "cleanse",
    "finetune",
    "finetuned",
    "influence",
    "planted_faults",
    "pretrain",
    "pretrained",
    "validate_lds",
    "validate_loo",
]
