"""Kronfluence 1.0.1 (Bae et al.; github.com/pomonam/kronfluence) on the shared single-stage problem.

Convention conversion (read from kronfluence's source, checked against msif's exact solver on digits):
* kronfluence's pairwise score is  S(z) = +∇f(T)ᵀ (G + λI)⁻¹ ∇L(z)  with f = `Task.compute_measurement` and L =
  `Task.compute_train_loss` (kronfluence/score/dot_product.py: a plain dot product of the preconditioned query gradient
  with the training gradient; a positive score means "helpful": removing z would raise f). msif's I(z) is
  −∇L_Tᵀ (H+λI)⁻¹ ∇ℓ(z), so we return −S.
* f(T) is the SUMMED cross-entropy of the test points and `ScoreArguments(aggregate_query_gradients=True)` sums the
  query gradients over all query batches, so the whole test set is one target, exactly L_T.
* L(z) uses reduction="sum", as kronfluence requires; for a single example that is ℓ(z).
* G is kronfluence's curvature, the (E)K-FAC / diagonal approximation of the Fisher (= Gauss-Newton for
  cross-entropy) of the MEAN loss over the Hessian sample: covariances and Λ are divided by the number of examples
  (kronfluence/factor/config.py `prepare`: `lambda_matrix.div_(NUM_LAMBDA_PROCESSED)`), so its units are those of H.
  We keep kronfluence's default true Fisher (labels sampled from the model's softmax, `use_empirical_fisher=False`),
  sampled with a torch.Generator seeded with 0. It is the Fisher/GGN, not the Hessian: on a network with negative
  Hessian curvature the two differ, so these methods are approximations even before the Kronecker factorisation.
* `ScoreArguments.damping_factor` is added to the eigenvalues of G (`lambda_matrix.add_(damping_factor)`), i.e.
  (G + λI)⁻¹ with λ = p.damping, the same λ as msif. (Its default, 1e-8, or None = 0.1 × mean eigenvalue, would not.)

Strategies not run: "identity" has no curvature (it ignores the damping, so it is not (H+λI)⁻¹ in any sense).
Kronfluence never forms the full Hessian. Everything runs on a deep copy of p.net (prepare_model wraps the modules
and turns off requires_grad), in a TemporaryDirectory (kronfluence writes factors and scores to disk).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch.utils.data import TensorDataset

from .problem import Problem


class _CrossEntropyTask(Task):
    """Batches are (x, y) tuples. Train loss and measurement are SUMMED cross-entropies (kronfluence's convention)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)  # label sampling for the true Fisher, deterministic

    def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                probs = torch.softmax(logits.detach().double(), dim=-1)
                y = torch.multinomial(probs, num_samples=1, generator=self.generator).flatten()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")


def _pairwise(p: Problem, strategy: str, query_batch: int, aggregate: bool) -> torch.Tensor:
    """Kronfluence's pairwise scores of the training examples against the test points (summed into one query when
    `aggregate`): factors fitted on the Hessian sample, everything on a deep copy of p.net in a temporary folder."""
    task = _CrossEntropyTask(seed=0)
    model = prepare_model(copy.deepcopy(p.net), task)  # never touch p.net
    with (
        tempfile.TemporaryDirectory(prefix="kronfluence-") as out,
        warnings.catch_warnings(),
        torch.random.fork_rng(devices=[]),  # DataLoader iterators draw a seed from the global RNG; leave it as it was
    ):
        # kronfluence 1.0.1 builds a (disabled) torch.cuda.amp.GradScaler, which torch 2.14 flags as deprecated.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*GradScaler.*")
        analyzer = Analyzer(
            analysis_name="msif_bench",
            model=model,
            task=task,
            cpu=True,
            log_level=logging.WARNING,
            disable_tqdm=True,
            output_dir=out,
            disable_model_save=True,
        )
        analyzer.fit_all_factors(
            factors_name=strategy,
            dataset=TensorDataset(p.x_hessian, p.y_hessian),
            per_device_batch_size=p.batch_size,
            factor_args=FactorArguments(strategy=strategy),
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name=f"{strategy}_scores",
            factors_name=strategy,
            query_dataset=TensorDataset(p.x_test, p.y_test),
            train_dataset=TensorDataset(p.x_train, p.y_train),
            per_device_query_batch_size=query_batch,
            per_device_train_batch_size=p.batch_size,
            score_args=ScoreArguments(damping_factor=p.damping, aggregate_query_gradients=aggregate),
            overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores(scores_name=f"{strategy}_scores")["all_modules"]


def _kronfluence(p: Problem, strategy: str) -> np.ndarray:
    scores = _pairwise(p, strategy, query_batch=len(p.y_test), aggregate=True)
    # scores: (1, m), +∇L_Tᵀ(G+λI)⁻¹∇ℓ(z) for the one aggregated query -> msif sign (positive = harmful).
    return -scores.reshape(-1).double().numpy()


def pairwise_per_test(p: Problem, strategy: str = "ekfac", query_batch: int = 100) -> np.ndarray:
    """Kronfluence's pairwise scores of every training example for each test point on its own (no aggregation):
    (m, n_test), msif's sign. Factors are fitted on the Hessian sample, as for the summed target."""
    return -_pairwise(p, strategy, query_batch, aggregate=False).double().numpy().T  # (n_test, m) -> (m, n_test)


METHODS: dict[str, Callable[[Problem], np.ndarray]] = {
    "kronfluence ekfac": lambda p: _kronfluence(p, "ekfac"),
    "kronfluence kfac": lambda p: _kronfluence(p, "kfac"),
    "kronfluence diagonal": lambda p: _kronfluence(p, "diagonal"),
}
