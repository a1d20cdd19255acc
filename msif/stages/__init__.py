"""The stages users run: each is a plain function of a composed config (tests call these directly); the `msif`
command (msif/cli.py) is a thin Hydra wrapper around them."""

from msif.stages.cleanse import cleanse
from msif.stages.finetune import finetune
from msif.stages.influence import influence
from msif.stages.pretrain import pretrain
from msif.stages.validate_loo import validate_loo

__all__ = ["cleanse", "finetune", "influence", "pretrain", "validate_loo"]
