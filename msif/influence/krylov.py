"""The Lanczos process behind the `lanczos` solver and the `lowrank` curvature fit (docs/MATH.md, "The solved systems").

`Krylov(H, B)` grows, one HVP per step for every row b of B at once, an orthonormal basis Q of the Krylov space
K_j(H, b) with full reorthogonalisation (two classical Gram–Schmidt passes), so that T = QᵀHQ is tridiagonal to
rounding: diagonal α, off-diagonal β. It also keeps each HVP's coefficients on the basis,
H q_i = Σ_{k≤i} c_ik q_k + β_i q_{i+1}, which hold exactly up to float rounding (an identity on the computed vectors,
not a recursion that drifts): H applied to anything in span(Q) then needs no further HVP.

A column whose space becomes invariant (β_j ≤ BREAKDOWN · eps · max|α|) stops growing (`live` is false, its next
basis vectors are zero): its Krylov space is exact.
"""

from __future__ import annotations

import torch

BREAKDOWN = 1e3  # in units of machine epsilon × max|α|: a smaller β_j ends the column's Krylov space


class Krylov:
    """Lanczos on H from each row of B (K, p); `step()` makes one HVP per column."""

    def __init__(self, H, B: torch.Tensor):
        self.H = H
        self.tiny = torch.finfo(B.dtype).tiny
        self.eps = torch.finfo(B.dtype).eps
        self.bnorm = B.norm(dim=1).clamp_min(self.tiny)
        self.Q = [B / self.bnorm[:, None]]  # q_0 .. q_j, each (K, p)
        self.alphas: list[torch.Tensor] = []  # α_i (K,)
        self.betas: list[torch.Tensor] = []  # β_i (K,), zero once a column has stopped
        self.coefs: list[torch.Tensor] = []  # c_i (K, i+1): H q_i's components on q_0 .. q_i
        self.live = torch.ones(len(B), dtype=torch.bool, device=B.device)

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def step(self) -> None:
        """α_j, β_j and q_{j+1} for every column, from one HVP each."""
        q = self.Q[-1]
        W = self.H.matvec(q)
        self.alphas.append((W * q).sum(1))
        basis = torch.stack(self.Q, 1)  # (K, j+1, p)
        c = torch.zeros(len(q), len(self.Q), dtype=q.dtype, device=q.device)
        for _ in range(2):
            proj = torch.einsum("kjp,kp->kj", basis, W)
            W -= torch.einsum("kjp,kj->kp", basis, proj)
            c += proj
        self.coefs.append(c)
        beta = W.norm(dim=1)
        scale = torch.stack(self.alphas, 1).abs().amax(1).clamp_min(self.tiny)
        self.live &= beta > BREAKDOWN * self.eps * scale
        beta = torch.where(self.live, beta, torch.zeros_like(beta))
        self.betas.append(beta)
        self.Q.append(torch.where(self.live[:, None], W / beta.clamp_min(self.tiny)[:, None], 0.0))

    def tridiagonal(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(α (K, j), the off-diagonal β_0..β_{j−2} (K, j−1) or None when j = 1, the last β_{j−1} (K,))."""
        off = torch.stack(self.betas[:-1], 1) if self.steps > 1 else None
        return torch.stack(self.alphas, 1), off, self.betas[-1]

    def basis(self, n: int | None = None) -> torch.Tensor:
        """(K, n, p): q_0 .. q_{n−1} (all j + 1 when n is None)."""
        return torch.stack(self.Q if n is None else self.Q[:n], 1)

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """x = ‖b‖ Q y for coefficients y (K, n), n ≤ j + 1."""
        y = y.to(self.Q[0].dtype)
        return self.bnorm[:, None] * torch.einsum("kjp,kj->kp", self.basis(y.shape[1]), y)

    def apply_H(self, y: torch.Tensor) -> torch.Tensor:
        """H x for x = ‖b‖ Q y with y (K, n), n ≤ j, from the recorded HVPs: ‖b‖ Q_{n+1} C y."""
        K, n = y.shape
        C = torch.zeros(K, n + 1, n, dtype=self.Q[0].dtype, device=y.device)
        for i in range(n):
            C[:, : i + 1, i] = self.coefs[i]
            C[:, i + 1, i] = self.betas[i]
        return self.combine(torch.einsum("kij,kj->ki", C, y.to(C.dtype)))

    def apply_H_to_b(self) -> torch.Tensor:
        """H b = ‖b‖ H q_0, from the first step's HVP."""
        return self.apply_H(torch.ones(len(self.bnorm), 1, dtype=self.Q[0].dtype, device=self.bnorm.device))
