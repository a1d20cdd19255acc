"""msif: multi-stage influence functions (Chen et al., 2020).

Which pretraining examples made a finetuned model right or wrong? The numerical library is `msif.influence` (torch
only); the `msif` command (msif.cli) runs the stages `pretrain` -> `finetune` -> `influence` -> `validate-loo` /
`cleanse`, which chain through run folders on disk. See README.md and docs/MATH.md.
"""

from msif.errors import MsifError

__version__ = "0.1.0"
__all__ = ["MsifError", "__version__"]
