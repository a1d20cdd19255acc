"""msif: multi-stage influence functions (Chen et al., 2020).

Which pretraining examples made a finetuned model right or wrong? The stages `pretrain` -> `finetune` ->
`influence` chain through run folders on disk; see README.md and ../shared/MATH.md for the mathematics.
"""

from msif.config import register_resolvers as _register_resolvers
from msif.errors import MsifError

__version__ = "0.1.0"
__all__ = ["MsifError", "__version__"]

_register_resolvers()
