"""Networks split the way the paper splits them (Section 3.1): a shared embedding W and task heads U and Θ.

The embedding/head contract (for plugging in your own network through a model config):

* `model.embedding._target_` is called as `factory(in_shape=(C, H, W) or (D,), **config)` and returns an
  `nn.Module` mapping a batch of inputs to features of shape (B, ...) (flattened by the head side).
* `model.head._target_` is called as `factory(in_features=int, num_classes=int, **config)` and returns an
  `nn.Module` mapping (B, in_features) features to (B, num_classes) logits.
* The pretrain network is `embedding -> head U`, the finetune network `embedding -> head Θ`, sharing the
  embedding's parameters W.
* Batch norm and dropout are welcome. Networks are trained in train mode (batch statistics, dropout on) and
  everything else (accuracies, influence, the leave-one-out retrains' test loss) runs in eval mode: running
  statistics frozen, dropout off. That eval-mode loss is the function whose Hessian msif computes; the running
  statistics are buffers, not parameters, so they are held fixed in W. Networks come out of the builders here in
  eval mode; `msif.training.fit` switches to train mode for its steps and back.
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
    """Convolutions and max-pools as listed, each convolution followed by the activation.

    `layers` is a list of `{conv: channels, kernel: k}` (optional `padding: p`, default 0, and `batchnorm: true` for
    a BatchNorm2d before the activation), `{pool: k}` (stride k) and `{dropout: p}` entries, as in Table A.
    The output is flattened to (B, features).
    """

    def __init__(self, in_shape, layers, activation: str = "tanh"):
        mods: list[nn.Module] = []
        channels = int(in_shape[0])
        for spec in layers:
            if "conv" in spec:
                out = int(spec["conv"])
                mods.append(nn.Conv2d(channels, out, int(spec["kernel"]), padding=int(spec.get("padding", 0))))
                if spec.get("batchnorm", False):
                    mods.append(nn.BatchNorm2d(out))
                mods.append(_activation(activation))
                channels = out
            elif "pool" in spec:
                mods.append(nn.MaxPool2d(int(spec["pool"]), int(spec["pool"])))
            elif "dropout" in spec:
                mods.append(nn.Dropout(float(spec["dropout"])))
            else:
                raise MsifError(
                    f"Unknown embedding layer {dict(spec)}.",
                    "Use {conv: C, kernel: K} (optional padding, batchnorm), {pool: K} or {dropout: p}.",
                )
        mods.append(nn.Flatten())
        super().__init__(*mods)


class BasicBlock(nn.Module):
    """The CIFAR ResNet block (He et al. 2016): two 3x3 convolutions with batch norm, plus the shortcut (a strided
    1x1 convolution with batch norm where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetEmbedding(nn.Module):
    """A CIFAR-style ResNet body: a 3x3 stem, then per stage `blocks[i]` BasicBlocks of `widths[i]` channels (stride
    2 from the second stage on), global average pooling to (B, widths[-1]). widths [16, 32, 64] with blocks
    [1, 1, 1] is ResNet-8, [3, 3, 3] ResNet-20."""

    def __init__(self, in_shape, widths=(16, 32, 64), blocks=(1, 1, 1)):
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise MsifError(
                f"ResNetEmbedding got widths {list(widths)} and blocks {list(blocks)}.",
                "Give one width and one block count per stage, e.g. widths: [16, 32, 64], blocks: [1, 1, 1].",
            )
        if len(in_shape) != 3:
            raise MsifError(f"ResNetEmbedding needs (C, H, W) images, not inputs of shape {tuple(in_shape)}.", None)
        self.stem = nn.Sequential(
            nn.Conv2d(int(in_shape[0]), int(widths[0]), 3, 1, 1, bias=False), nn.BatchNorm2d(int(widths[0])), nn.ReLU()
        )
        stages, cin = [], int(widths[0])
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(int(n)):
                stages.append(BasicBlock(cin, int(w), 2 if (i > 0 and j == 0) else 1))
                cin = int(w)
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean((2, 3))


class TorchvisionBackbone(nn.Module):
    """`torchvision.models.<name>` with its classifier replaced by the identity, as an embedding: its features
    (e.g. ResNet-18's 512) go to msif's heads. `weights`: a local state_dict file of the full torchvision model
    (loaded with weights_only=True; the classifier's entries are dropped); nothing is downloaded."""

    CLASSIFIERS = ("fc", "classifier", "heads", "head")

    def __init__(self, in_shape, name: str, weights: str | None = None, **kwargs):
        super().__init__()
        import torchvision

        try:
            net = torchvision.models.get_model(name, weights=None, **kwargs)
        except (ValueError, TypeError) as err:
            raise MsifError(
                f"torchvision.models has no model '{name}' taking {kwargs} ({err}).",
                "Use a name from torchvision.models.list_models(), e.g. resnet18.",
            ) from None
        if weights:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
            missing, unexpected = net.load_state_dict(strip_prefix(state), strict=False)
            kept = [k for k in missing if k.split(".")[0] not in self.CLASSIFIERS]
            if kept or unexpected:
                raise MsifError(
                    f"The weights {weights} do not fit torchvision.models.{name}: missing {kept[:5]}, unexpected "
                    f"{list(unexpected)[:5]}.",
                    "Give the state_dict of the same architecture.",
                )
        for attr in self.CLASSIFIERS:
            if hasattr(net, attr):
                setattr(net, attr, nn.Identity())
                break
        else:
            raise MsifError(
                f"torchvision.models.{name} has none of the classifier attributes {self.CLASSIFIERS}.", None
            )
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    """A state_dict without DistributedDataParallel's `module.` prefix on every key."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


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


class LSTMEmbedding(nn.Module):
    """Text: token ids (b, L) -> token embedding -> LSTM, the hidden state at every position, followed by the
    position's token mask as one more feature (1 for a token, 0 for padding): (b, L, hidden + 1). The LSTM reads left
    to right, so the state at t has seen tokens ≤ t and predicts token t + 1 (a language model's features); a
    classifier head pools the states of the tokens (the mask says which).

    `bidirectional` (ELMo's): a second stack of layers reads right to left, its state at t has seen tokens ≥ t and
    predicts token t − 1; the output is (b, L, 2·hidden + 1), the forward states, then the backward ones, then the
    mask. The backward stack starts at the last token (its state stays zero over the padding after it)."""

    def __init__(
        self, in_shape, vocab_size: int, dim: int = 128, hidden: int = 128, layers: int = 1, bidirectional=False
    ):
        super().__init__()
        self.tokens = nn.Embedding(int(vocab_size), int(dim), padding_idx=0)
        self.hidden = int(hidden)
        self.bidirectional = bool(bidirectional)
        # the LSTM cell written out (nn.LSTM's fused kernel has no forward-mode derivative, which scoring uses)
        self.cells, self.recurrent = self._stack(int(dim), int(layers))
        if self.bidirectional:
            self.back_cells, self.back_recurrent = self._stack(int(dim), int(layers))

    def _stack(self, dim: int, layers: int) -> tuple[nn.ModuleList, nn.ModuleList]:
        h = self.hidden
        cells = nn.ModuleList([nn.Linear(dim if i == 0 else h, 4 * h) for i in range(layers)])
        return cells, nn.ModuleList([nn.Linear(h, 4 * h, bias=False) for _ in range(layers)])

    def _run(self, seq, mask, cells, recurrent, order) -> torch.Tensor:
        for cell, rec in zip(cells, recurrent, strict=True):
            inputs = cell(seq)  # (b, L, 4H): the input part of every gate at every position, at once
            h = seq.new_zeros(len(seq), self.hidden)
            c = seq.new_zeros(len(seq), self.hidden)
            states = [None] * seq.shape[1]
            for t in order:
                i, f, g, o = (inputs[:, t] + rec(h)).chunk(4, dim=1)
                c = (torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)) * mask[:, t]
                h = torch.sigmoid(o) * torch.tanh(c)
                states[t] = h
            seq = torch.stack(states, 1)
        return seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        seq = self.tokens(ids)
        mask = (ids != 0).to(seq.dtype).unsqueeze(-1)
        length = ids.shape[1]
        # padding only follows the tokens, so zeroing the cell there changes no forward state at a token
        out = [self._run(seq, mask, self.cells, self.recurrent, range(length))]
        if self.bidirectional:
            out.append(self._run(seq, mask, self.back_cells, self.back_recurrent, range(length - 1, -1, -1)))
        return torch.cat([*(o * mask for o in out), mask], -1)


class CausalTransformerEmbedding(nn.Module):
    """Text, the alternative to the LSTM: token and learned position embeddings, then pre-norm transformer blocks of
    causal self-attention (a position attends to itself and the positions before it) and a ReLU MLP; output as
    LSTMEmbedding's, the state at every position and the token mask, (b, L, dim + 1). Attention is written out
    (softmax of masked scores), so every torch.func transform msif uses applies."""

    def __init__(self, in_shape, vocab_size: int, dim: int = 128, heads: int = 4, layers: int = 2, mlp: int = 256):
        super().__init__()
        length, dim, heads = int(in_shape[0]), int(dim), int(heads)
        if dim % heads:
            raise ValueError(f"model.embedding.dim={dim} is not a multiple of heads={heads}")
        self.tokens = nn.Embedding(int(vocab_size), dim, padding_idx=0)
        self.positions = nn.Parameter(torch.zeros(length, dim))
        nn.init.normal_(self.positions, std=0.02)
        self.blocks = nn.ModuleList(
            [
                nn.ModuleDict(
                    {
                        "norm1": nn.LayerNorm(dim),
                        "qkv": nn.Linear(dim, 3 * dim),
                        "out": nn.Linear(dim, dim),
                        "norm2": nn.LayerNorm(dim),
                        "mlp1": nn.Linear(dim, int(mlp)),
                        "mlp2": nn.Linear(int(mlp), dim),
                    }
                )
                for _ in range(int(layers))
            ]
        )
        self.heads = heads
        self.register_buffer("causal", torch.ones(length, length).tril().bool(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        b, length = ids.shape
        h = self.tokens(ids) + self.positions[:length]
        keep = self.causal[:length, :length] & (ids != 0).unsqueeze(1).unsqueeze(1)  # (b, 1, L, L): no padding keys
        keep = keep | torch.eye(length, dtype=torch.bool, device=ids.device)  # a padding position sees itself
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](h)).chunk(3, dim=-1)
            q, k, v = (t.view(b, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            weights = scores.masked_fill(~keep, float("-inf")).softmax(-1)
            attended = (weights @ v).transpose(1, 2).reshape(b, length, -1)
            h = h + block["out"](attended)
            h = h + block["mlp2"](torch.relu(block["mlp1"](block["norm2"](h))))
        mask = (ids != 0).to(h.dtype).unsqueeze(-1)
        return torch.cat([h * mask, mask], -1)


class TokenHead(nn.Module):
    """A language model's output layer U: the logits of the next token at every position, (b, L, V), from the
    flattened (b, L·(hidden + 1)) features of an LSTMEmbedding (its mask feature unused). `bidirectional`: the
    features hold forward and backward states, and one shared softmax gives the forward logits (the next token) then
    the backward ones (the previous token), (b, 2L, V), as the targets of `msif.data.text.both_directions`."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, bidirectional: bool = False):
        super().__init__()
        self.directions = 2 if bidirectional else 1
        self.width = self.directions * int(hidden) + 1
        self.out = nn.Linear(int(hidden), int(num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        states = features.view(len(features), -1, self.width)[..., :-1]
        if self.directions == 2:
            states = torch.cat(states.chunk(2, dim=-1), 1)  # (b, 2L, hidden): forward positions, then backward
        return self.out(states)


class PooledHead(nn.Module):
    """A sentence classifier Θ: the mean of the token states (padding excluded), then fully connected layers
    (`fc` widths, ReLU) to the logits (b, num_classes); the paper's NLP head is fc=[64]. `bidirectional`: the
    states are both directions' (2·hidden wide), as ELMo's features."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, fc=(64,), bidirectional: bool = False):
        super().__init__()
        width = (2 if bidirectional else 1) * int(hidden)
        self.width = width + 1
        layers: list[nn.Module] = []
        for h in fc:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, int(num_classes)))
        self.mlp = nn.Sequential(*layers)
        # a fixed affine map of the pooled features (identity until `standardize`): constants, not parameters of Θ
        self.register_buffer("shift", torch.zeros(self.width - 1))
        self.register_buffer("scale", torch.ones(self.width - 1))

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        f = features.view(len(features), -1, self.width)
        states, mask = f[..., :-1], f[..., -1:]
        return states.sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp((self.pooled(features) - self.shift) / self.scale)

    @torch.no_grad()
    def standardize(self, features: torch.Tensor) -> None:
        """Fix the input map so that the pooled training features have mean 0 and standard deviation 1 per
        dimension. A language model's pooled states share a large offset and vary little around it (mean |f| 0.39,
        standard deviation 0.10 on rt-polarity): a head trained on them as they are fits little (59% train accuracy)
        and hides what pretraining transferred. Set once, before Θ is trained; retrains keep it."""
        pooled = self.pooled(features.to(self.shift.dtype))
        self.shift.copy_(pooled.mean(0))
        self.scale.copy_(pooled.std(0).clamp_min(1e-6))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a head saved before the map existed: the identity map, as it computed then
        state_dict.setdefault(prefix + "shift", torch.zeros_like(self.shift))
        state_dict.setdefault(prefix + "scale", torch.ones_like(self.scale))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TwoStageNet(nn.Module):
    """`head(embedding(x))`. The embedding's parameters are W; the head's are U (pretrain) or Θ (finetune)."""

    def __init__(self, embedding: nn.Module, head: nn.Module):
        super().__init__()
        self.embedding = embedding
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(x).flatten(1))


def build_embedding(model: DictConfig, input_shape: tuple[int, ...]) -> nn.Module:
    return _instantiate(model.embedding, "model.embedding", in_shape=tuple(input_shape)).eval()


def feature_dim(embedding: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Size of the flattened embedding output, found with one forward pass of a zero input."""
    p = next(iter(embedding.parameters()), None)
    dtype = p.dtype if p is not None else torch.float32
    was = embedding.training
    embedding.eval()  # batch norm cannot take the batch statistics of one example
    with torch.no_grad():
        out = embedding(torch.zeros((1, *input_shape), dtype=dtype))
    embedding.train(was)
    return int(out.flatten(1).shape[1])


def build_head(model: DictConfig, in_features: int, num_classes: int, stage: str | None = None) -> nn.Module:
    """The stage's head: `model.<stage>_head` when the model has one (a language model's output layer, a sentence
    classifier), else `model.head` for both."""
    key = f"{stage}_head" if stage and model.get(f"{stage}_head") is not None else "head"
    return _instantiate(model[key], f"model.{key}", in_features=in_features, num_classes=num_classes).eval()


def build_pretrain_net(
    model: DictConfig, input_shape, num_classes: int, seed: int, dtype: torch.dtype = torch.float32
) -> TwoStageNet:
    """Embedding W and pretrain head U, initialised from `seed`."""
    torch.manual_seed(seed)
    embedding = build_embedding(model, input_shape).to(dtype)
    head = build_head(model, feature_dim(embedding, input_shape), num_classes, "pretrain").to(dtype)
    return TwoStageNet(embedding, head).eval()


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
    head = build_head(model, feature_dim(embedding, input_shape), num_classes, "finetune").to(dtype)
    return TwoStageNet(embedding, head).eval()


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
    "BasicBlock",
    "ConvEmbedding",
    "MLPEmbedding",
    "ResNetEmbedding",
    "TorchvisionBackbone",
    "MLPHead",
    "TwoStageNet",
    "build_embedding",
    "build_finetune_net",
    "build_head",
    "build_pretrain_net",
    "count_parameters",
    "feature_dim",
    "parameter_groups",
    "strip_prefix",
]
