"""The pretraining and finetuning tasks (the paper's Section 3.1), each cut from its stage's source.

The pretraining task keeps the source classes in `dataset.pretrain.classes`, relabelled 0..k-1 in that order; the
finetuning task likewise, optionally subsampled (the paper samples 5,000 finetune training examples). Example i of
the pretraining set is row i here, in increasing source order, for every stage and output: `index` in a score table
is this i, and `source_index` is the row in the original training split, so any example can be looked up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from msif.data.sources import Source, load_source, source_spec
from msif.errors import MsifError


@dataclass
class Examples:
    """A labelled set: inputs `x` (normalised float), labels `y` in 0..k-1, and where each row came from."""

    x: torch.Tensor
    y: torch.Tensor
    source_index: torch.Tensor  # row in the source split (train or test)
    class_names: list[str]  # class_names[y] is the name of label y
    flipped: torch.Tensor | None = None  # rows whose label was deliberately changed (planted faults), sorted
    true_y: torch.Tensor | None = None  # the labels before they were changed, when any were
    texts: list[str] | None = None  # text: each row's sentence (x holds its token ids)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def language_model(self) -> bool:
        """Next-token prediction: y holds each position's target token (one row of targets per example)."""
        return self.y.dim() == 2

    def label_names(self, rows=None) -> np.ndarray:
        """The class name of each row (`rows`: all when None); a language-model set's rows are all "sentence"."""
        n = len(self) if rows is None else len(rows)
        if self.language_model:
            return np.full(n, "sentence", dtype=object)
        labels = self.y if rows is None else self.y[torch.as_tensor(rows)]
        return np.array(self.class_names, dtype=object)[labels.numpy()]

    def labels(self, rows=None) -> np.ndarray:
        """Each row's label (−1 for a language-model set, which has none)."""
        n = len(self) if rows is None else len(rows)
        if self.language_model:
            return np.full(n, -1)
        return (self.y if rows is None else self.y[torch.as_tensor(rows)]).numpy()

    def to(self, dtype: torch.dtype) -> Examples:
        x = self.x.to(dtype) if self.x.is_floating_point() else self.x  # token ids stay integers
        return Examples(x, self.y, self.source_index, self.class_names, self.flipped, self.true_y, self.texts)


@dataclass
class Task:
    train: Examples
    test: Examples

    @property
    def num_classes(self) -> int:
        return len(self.train.class_names)


@dataclass
class Tasks:
    pretrain: Task
    finetune: Task
    input_shape: tuple[int, ...]
    source: str
    vocabulary: list[str] | None = None  # text: the tokens, built from the pretraining sentences


def build_tasks(ds: DictConfig, cache_dir: str | None = None, dtype: torch.dtype = torch.float32) -> Tasks:
    """Load each stage's source (`dataset.<stage>.source`, default `dataset.source`; one load when they are the same)
    and cut the pretraining and finetuning tasks out of them as the config says."""
    specs = {stage: source_spec(ds, stage) for stage in ("pretrain", "finetune")}
    sources = {"pretrain": load_source(specs["pretrain"], cache_dir)}
    same = _identity(specs["finetune"]) == _identity(specs["pretrain"])
    sources["finetune"] = sources["pretrain"] if same else load_source(specs["finetune"], cache_dir)
    if sources["pretrain"].text or sources["finetune"].text:
        return _text_tasks(ds, sources, same)
    shapes = {stage: s.input_shape for stage, s in sources.items()}
    if shapes["pretrain"] != shapes["finetune"]:
        raise MsifError(
            f"The pretraining inputs have shape {shapes['pretrain']} per example and the finetuning inputs "
            f"{shapes['finetune']}: one network cannot take both.",
            "Give the two sources the same channels and size (an image source's channels, resize and crop options).",
        )
    seed = int(ds.finetune.get("subsample_seed", 0))
    pre, fin = sources["pretrain"], sources["finetune"]
    pre_classes = resolve_classes(ds.pretrain.get("classes"), pre.class_names, "dataset.pretrain.classes")
    fin_classes = resolve_classes(ds.finetune.get("classes"), fin.class_names, "dataset.finetune.classes")
    tasks = Tasks(
        pretrain=Task(
            _select(pre, "train", pre_classes, ds.pretrain.get("n_train"), seed, "dataset.pretrain.n_train"),
            _select(pre, "test", pre_classes, None, seed, ""),
        ),
        finetune=Task(
            _select(fin, "train", fin_classes, ds.finetune.get("n_train"), seed, "dataset.finetune.n_train"),
            _select(fin, "test", fin_classes, ds.finetune.get("n_test"), seed, "dataset.finetune.n_test"),
        ),
        input_shape=pre.input_shape,
        source=pre.name if same else f"{pre.name} → {fin.name}",
    )
    noise = ds.pretrain.get("label_noise")
    if noise is not None and float(noise.fraction) > 0:
        tasks.pretrain.train = flip_labels(tasks.pretrain.train, float(noise.fraction), int(noise.seed))
    if dtype != torch.float32:
        for task in (tasks.pretrain, tasks.finetune):
            task.train, task.test = task.train.to(dtype), task.test.to(dtype)
    return tasks


def flip_labels(examples: Examples, fraction: float, seed: int) -> Examples:
    """A copy of `examples` with the labels of round(fraction · n) rows (a seeded draw) changed to another class,
    drawn uniformly from the other k − 1: planted faults whose rows (`flipped`) and true labels are known."""
    n, k = len(examples), len(examples.class_names)
    count = int(round(fraction * n))
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=gen)[:count].sort().values
    shift = torch.randint(1, k, (count,), generator=gen)
    y = examples.y.clone()
    y[rows] = (examples.y[rows] + shift) % k
    return Examples(
        examples.x, y, examples.source_index, examples.class_names, rows, examples.y.clone(), examples.texts
    )


def resolve_classes(spec, class_names: list[str], where: str) -> list[int]:
    """Turn a class list (indices or names; null = all of the source's classes) into source label indices, refusing
    empty, unknown or repeated entries."""
    if spec is None:
        spec = list(range(len(class_names)))
    if len(spec) == 0:
        raise MsifError(f"{where} is empty.", f"List at least two of the classes {class_names}.")
    ids = []
    for c in spec:
        if isinstance(c, str) and c in class_names:
            ids.append(class_names.index(c))
        elif isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(class_names):
            ids.append(c)
        else:
            raise MsifError(
                f"{where} contains {c!r}, which is not a class of this data set.",
                f"Use class indices 0..{len(class_names) - 1} or the names {class_names}.",
            )
    if len(set(ids)) != len(ids):
        dup = sorted({class_names[i] for i in ids if ids.count(i) > 1})
        raise MsifError(f"{where} lists the classes {dup} more than once.", "List each class once.")
    if len(ids) < 2:
        raise MsifError(
            f"{where} has a single class ({class_names[ids[0]]}); a classification task needs two.",
            f"List at least two of {class_names}.",
        )
    return ids


def _select(source: Source, split: str, classes: list[int], n: int | None, seed: int, key: str) -> Examples:
    x_all, y_all = (source.x_train, source.y_train) if split == "train" else (source.x_test, source.y_test)
    relabel = torch.full((max(len(source.class_names), int(y_all.max()) + 1),), -1, dtype=torch.long)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    idx = torch.nonzero(relabel[y_all] >= 0).flatten()  # increasing source order
    if len(idx) == 0:
        raise MsifError(
            f"The {split} split of '{source.name}' has no examples of the classes "
            f"{[source.class_names[c] for c in classes]}.",
            "Check the data folder and class lists.",
        )
    if n is not None:
        if not isinstance(n, int) or n < 1:
            raise MsifError(f"{key} must be a positive integer or null, got {n!r}.", f"Set e.g. {key}=500.")
        if n > len(idx):
            raise MsifError(
                f"{key}={n} asks for more examples than the {split} split has for these classes ({len(idx)}).",
                f"Use {key}={len(idx)} or less, or {key}=null for all of them.",
            )
        gen = torch.Generator().manual_seed(seed)
        idx = idx[torch.randperm(len(idx), generator=gen)[:n]].sort().values
    rows = x_all[idx] if isinstance(x_all, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x_all[idx.numpy()]))
    x = rows.float() * source.scale
    if source.normalize is not None:
        mean = torch.tensor(list(source.normalize[0]), dtype=torch.float32)
        std = torch.tensor(list(source.normalize[1]), dtype=torch.float32)
        if x.dim() < 2 or len(mean) != x.shape[1] or len(std) != x.shape[1]:
            raise MsifError(
                f"The normalisation of '{source.name}' has {len(mean)} means for inputs of shape {tuple(x.shape[1:])}.",
                "Give one mean and one std per input channel (dataset.normalize, or the source's normalize).",
            )
        view = (1, -1) + (1,) * (x.dim() - 2)
        x = (x - mean.view(view)) / std.view(view)
    return Examples(x.contiguous(), relabel[y_all[idx]], idx, [source.class_names[c] for c in classes])


def _text_tasks(ds: DictConfig, sources: dict[str, Source], same: bool) -> Tasks:
    """Both stages from text sources, encoded with one vocabulary built from the pretraining sentences."""
    from msif.data import text

    pre, fin = sources["pretrain"], sources["finetune"]
    if not (pre.text and fin.text):
        raise MsifError(
            "One stage reads text and the other images or arrays: one network cannot take both.",
            "Give both stages text sources (kind text or labelled_text).",
        )
    options = ds.get("text") or {}
    size, max_len = int(options.get("vocab_size", 10000)), int(options.get("max_len", 32))
    targets = text.both_directions if options.get("bidirectional", False) else text.next_tokens
    vocabulary = text.build_vocabulary(pre.x_train, size)
    seed = int(ds.finetune.get("subsample_seed", 0))

    def cut(source: Source, stage: str, split: str, n, key: str) -> Examples:
        sentences, y_all = (source.x_train, source.y_train) if split == "train" else (source.x_test, source.y_test)
        if source.language_model:
            if ds[stage].get("classes") is not None:
                raise MsifError(
                    f"dataset.{stage}.classes is set, but the {stage} source is unlabelled text (a language model).",
                    f"Set dataset.{stage}.classes=null.",
                )
            idx = torch.arange(len(sentences))
            names = vocabulary
        else:
            classes = resolve_classes(ds[stage].get("classes"), source.class_names, f"dataset.{stage}.classes")
            relabel = torch.full((len(source.class_names),), -1, dtype=torch.long)
            relabel[torch.tensor(classes)] = torch.arange(len(classes))
            idx = torch.nonzero(relabel[y_all] >= 0).flatten()
            names = [source.class_names[c] for c in classes]
        if n is not None:
            if not isinstance(n, int) or n < 1 or n > len(idx):
                raise MsifError(
                    f"{key}={n!r}: the {split} split has {len(idx)} sentences for this selection.",
                    f"Use a positive {key} of at most {len(idx)}, or null for all of them.",
                )
            gen = torch.Generator().manual_seed(seed)
            idx = idx[torch.randperm(len(idx), generator=gen)[:n]].sort().values
        chosen = [sentences[int(i)] for i in idx]
        x = text.encode(chosen, vocabulary, max_len)
        y = targets(x) if source.language_model else relabel[y_all[idx]]
        return Examples(x, y, idx, names, texts=chosen)

    tasks = Tasks(
        pretrain=Task(
            cut(pre, "pretrain", "train", ds.pretrain.get("n_train"), "dataset.pretrain.n_train"),
            cut(pre, "pretrain", "test", None, ""),
        ),
        finetune=Task(
            cut(fin, "finetune", "train", ds.finetune.get("n_train"), "dataset.finetune.n_train"),
            cut(fin, "finetune", "test", ds.finetune.get("n_test"), "dataset.finetune.n_test"),
        ),
        input_shape=(max_len + 2,),
        source=pre.name if same else f"{pre.name} → {fin.name}",
        vocabulary=vocabulary,
    )
    noise = ds.pretrain.get("label_noise")
    if noise is not None and float(noise.fraction) > 0:
        if tasks.pretrain.train.language_model:
            raise MsifError(
                "Planted label faults need labels; the pretraining set is unlabelled text (a language model).",
                "Run planted-faults on a labelled pretraining set.",
            )
        tasks.pretrain.train = flip_labels(tasks.pretrain.train, float(noise.fraction), int(noise.seed))
    return tasks


def _identity(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "where"}
