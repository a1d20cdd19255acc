"""Networks split the way the paper splits them (Section 3.1): a shared embedding W and task heads U and Θ.

The embedding/head contract (for plugging in your own network through a model config):

* `model.embedding._target_` is called as `factory(in_shape=(C, H, W) or (D,), **config)` and returns an
  `nn.Module` mapping a batch of inputs to features of shape (B, ...) (flattened by the head side).
* `model.head._target_` is called as `factory(in_features=int, num_classes=int, **config)` and returns an
  `nn.Module` mapping (B, in_features) features to (B, num_classes) logits.
* The pretrain network is `embedding -> head U`, the finetune network `embedding -> head Θ`, sharing the
  embedding's parameters W. No batch-norm statistics or dropout: the influence function differentiates the loss as
  a pure function of the parameters.
"""

from __future__ import annotations

import math

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from msif.errors import MsifError

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise MsifError(f"Unknown activation '{name}'.", f"Use one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]()


class ConvEmbedding(nn.Sequential):
    """Convolutions (stride 1, no padding) and max-pools as listed, each convolution followed by the activation.

    `layers` is a list of `{conv: channels, kernel: k}` and `{pool: k}` entries (pool stride = k), as in Table A.
    The output is flattened to (B, features).
    """

    def __init__(self, in_shape, layers, activation: str = "tanh"):
        mods: list[nn.Module] = []
        channels = int(in_shape[0])
        for spec in layers:
            if "conv" in spec:
                mods += [nn.Conv2d(channels, int(spec["conv"]), int(spec["kernel"])), _activation(activation)]
                channels = int(spec["conv"])
            elif "pool" in spec:
                mods.append(nn.MaxPool2d(int(spec["pool"]), int(spec["pool"])))
            else:
                raise MsifError(f"Unknown embedding layer {dict(spec)}.", "Use {conv: C, kernel: K} or {pool: K}.")
        mods.append(nn.Flatten())
        super().__init__(*mods)


class MLPEmbedding(nn.Sequential):
    """Flatten, then Linear + activation for each width in `hidden`."""

    def __init__(self, in_shape, hidden, activation: str = "tanh"):
        mods: list[nn.Module] = [nn.Flatten()]
        width = math.prod(int(s) for s in in_shape)
        for h in hidden:
            mods += [nn.Linear(width, int(h)), _activation(activation)]
            width = int(h)
        super().__init__(*mods)


class MLPHead(nn.Sequential):
    """Fully connected layers: `hidden` widths with the activation, then a linear layer to the logits."""

    def __init__(self, in_features: int, num_classes: int, hidden=(), activation: str = "tanh"):
        mods: list[nn.Module] = []
        width = in_features
        for h in hidden:
            mods += [nn.Linear(width, int(h)), _activation(activation)]
            width = int(h)
        mods.append(nn.Linear(width, num_classes))
        super().__init__(*mods)


class TwoStageNet(nn.Module):
    """`head(embedding(x))`. The embedding's parameters are W; the head's are U (pretrain) or Θ (finetune)."""

    def __init__(self, embedding: nn.Module, head: nn.Module):
        super().__init__()
        self.embedding = embedding
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(x).flatten(1))


def build_embedding(model: DictConfig, input_shape: tuple[int, ...]) -> nn.Module:
    return _instantiate(model.embedding, "model.embedding", in_shape=tuple(input_shape))


def feature_dim(embedding: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Size of the flattened embedding output, found with one forward pass of a zero input."""
    p = next(iter(embedding.parameters()), None)
    dtype = p.dtype if p is not None else torch.float32
    with torch.no_grad():
        out = embedding(torch.zeros((1, *input_shape), dtype=dtype))
    return int(out.flatten(1).shape[1])


def build_head(model: DictConfig, in_features: int, num_classes: int) -> nn.Module:
    return _instantiate(model.head, "model.head", in_features=in_features, num_classes=num_classes)


def build_pretrain_net(
    model: DictConfig, input_shape, num_classes: int, seed: int, dtype: torch.dtype = torch.float32
) -> TwoStageNet:
    """Embedding W and pretrain head U, initialised from `seed`."""
    torch.manual_seed(seed)
    embedding = build_embedding(model, input_shape).to(dtype)
    head = build_head(model, feature_dim(embedding, input_shape), num_classes).to(dtype)
    return TwoStageNet(embedding, head)


def build_finetune_net(
    model: DictConfig,
    embedding: nn.Module,
    input_shape,
    num_classes: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> TwoStageNet:
    """The given (pretrained) embedding W with a new finetune head Θ initialised from `seed`."""
    torch.manual_seed(seed + 1)  # a different stream from the pretrain initialisation
    head = build_head(model, feature_dim(embedding, input_shape), num_classes).to(dtype)
    return TwoStageNet(embedding, head)


def parameter_groups(pretrain_net: TwoStageNet, finetune_net: TwoStageNet | None = None) -> dict[str, dict]:
    """The paper's parameter groups by name: W (shared embedding), U (pretrain head), Theta = Θ (finetune head).

    Each group maps parameter names (as in the module's state dict) to the parameter tensors.
    """
    groups = {
        "W": dict(pretrain_net.embedding.named_parameters()),
        "U": dict(pretrain_net.head.named_parameters()),
    }
    if finetune_net is not None:
        groups["Theta"] = dict(finetune_net.head.named_parameters())
    return groups


def count_parameters(params: dict) -> int:
    return sum(p.numel() for p in params.values())


def _instantiate(node: DictConfig, where: str, **kwargs) -> nn.Module:
    if node is None or "_target_" not in node:
        raise MsifError(f"{where} has no _target_.", "Name the factory, e.g. _target_: msif.models.MLPHead.")
    try:
        module = instantiate(node, **kwargs, _convert_="all")
    except (InstantiationException, MsifError, TypeError, ValueError) as err:
        cause = err.__cause__ or err
        raise MsifError(
            f"Could not build {where} ({node._target_}): {cause}".replace("\n", " "),
            "Check the model config against the embedding/head contract in msif/models.py.",
        ) from None
    if not isinstance(module, nn.Module):
        raise MsifError(
            f"{where} ({node._target_}) returned a {type(module).__name__}, not a torch nn.Module.",
            "The factory must return an nn.Module.",
        )
    return module


__all__ = [
    "ConvEmbedding",
    "MLPEmbedding",
    "MLPHead",
    "TwoStageNet",
    "build_embedding",
    "build_finetune_net",
    "build_head",
    "build_pretrain_net",
    "count_parameters",
    "feature_dim",
    "parameter_groups",
]
