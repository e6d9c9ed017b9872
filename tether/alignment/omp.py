r"""Batch orthogonal matching pursuit (Rubinstein, Zibulevsky and Elad, 2008).

Problem. For each target x (a row of X, dimension d) find at most k atoms of a dictionary D
(M rows, unit norm) and coefficients gamma minimizing ||x - D_I^T gamma|| greedily: at each
step add the atom most correlated with the residual r = x - D_I^T gamma, then re-fit gamma by
least squares on the chosen atoms.

Batch-OMP never forms the residual in the embedding space. With the Gram matrix G = D D^T
(precomputed once) and the initial correlations alpha^0 = D x (one matrix product for the
whole batch), the correlations alpha = D r are updated in atom space. Here the update is the
Gram-Schmidt form of it: let q_t be the t-th chosen atom d_j made orthonormal to the earlier
ones; its correlations with every atom are

    u_t = D q_t = (G_{:,j} - sum_{s<t} <q_s, d_j> u_s) / ||d_j - proj||,   ||.||^2 = u'_t[j],

(u' before the division), and the new residual drops its component along q_t, so

    alpha <- alpha - (alpha[j] / ||d_j - proj||) u_t.

Each step costs M t multiply-adds per target (one row of G, gathered, and the earlier u_s)
instead of the M d of a fresh correlation D r; it is the same arithmetic as updating
alpha = alpha^0 - G_I gamma with a Cholesky factor of G_II, with the factor kept implicitly.

Everything is batched over targets; memory is O(B M k) for the u_s, so the batch size bounds
it. The Gram matrix can be kept in bfloat16 (it only steers the choice of atoms; the final
coefficients are re-fitted in float32 by least squares on the chosen atoms themselves).
"""

from __future__ import annotations

import torch


def gram(dictionary: torch.Tensor, dtype: torch.dtype | None = None,
         chunk: int = 4096) -> torch.Tensor:
    """G = D D^T for unit-norm rows of ``dictionary``, in ``dtype`` (default: D's), computed
    in row blocks so that only the result is held at full size."""
    n = dictionary.shape[0]
    out = torch.empty(n, n, dtype=dtype or dictionary.dtype, device=dictionary.device)
    for start in range(0, n, chunk):
        out[start:start + chunk] = dictionary[start:start + chunk] @ dictionary.T
    return out


def batch_omp(targets: torch.Tensor, dictionary: torch.Tensor, k: int,
              gram_matrix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes of ``targets`` [B, d] over unit-norm ``dictionary`` rows [M, d].

    Returns ``(indices [B, t], coefficients [B, t])``, t <= k, such that
    targets[b] ~= sum_s coefficients[b, s] * dictionary[indices[b, s]]. The loop stops early
    only once every target of the batch is represented exactly; a target represented before
    the others keeps gaining atoms, which the final least-squares fit gives weight ~0.
    """
    B, _ = targets.shape
    device, ftype = targets.device, torch.float32
    G = gram(dictionary) if gram_matrix is None else gram_matrix
    alpha0 = targets.to(ftype) @ dictionary.to(ftype).T  # [B, M]
    M = alpha0.shape[1]
    k = min(k, M)
    alpha = alpha0.clone()
    floor = 1e-6 * alpha0.abs().amax(dim=1).clamp_min(1e-30)
    chosen = torch.zeros(B, k, dtype=torch.long, device=device)
    # U[:, s] = D q_s: correlations of every atom with the s-th chosen atom orthonormalized
    # against the earlier ones (Gram-Schmidt carried out in correlation space)
    U = torch.empty(B, k, M, dtype=ftype, device=device)
    rows = torch.arange(B, device=device)
    steps = 0
    for t in range(k):
        # chosen atoms are orthogonal to the residual: their alpha is (numerically) zero
        j = alpha.abs().argmax(dim=1)
        top = alpha[rows, j]
        if (top.abs() <= floor).all():
            break  # every target is already represented exactly
        chosen[:, t] = j
        u = U[:, t:t + 1]  # [B, 1, M], written in place
        u.copy_(G[j].unsqueeze(1))
        if t:
            # <q_s, d_j> for the earlier atoms: column j of U (a gather, not a copy of U)
            a = U[:, :t].gather(2, j.view(B, 1, 1).expand(B, t, 1)).squeeze(2)  # [B, t]
            if device.type == "cuda":  # one batched product over the strided view
                u.sub_(torch.bmm(a.unsqueeze(1), U[:, :t]))
            else:  # one matrix-vector product per target (the CPU's bmm would copy U)
                for b in range(B):
                    torch.addmv(u[b, 0], U[b, :t].T, a[b], alpha=-1.0, out=u[b, 0])
        norm = u[rows, 0, j].clamp_min(1e-12).sqrt()  # ||d_j - projection||
        u.div_(norm[:, None, None])
        # the residual loses its component along the new orthonormal direction
        alpha.addcmul_(u.squeeze(1), (top / norm)[:, None], value=-1.0)
        alpha[rows.unsqueeze(1), chosen[:, :t + 1]] = 0.0
        steps = t + 1
    indices = chosen[:, :steps]
    return indices, refit(targets, dictionary, indices)


def refit(targets: torch.Tensor, dictionary: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Least-squares coefficients of each target on its chosen atoms, in float32."""
    atoms = dictionary[indices].to(torch.float32)  # [B, t, d]
    x = targets.to(torch.float32).unsqueeze(-1)  # [B, d, 1]
    solution = torch.linalg.lstsq(atoms.transpose(1, 2), x).solution
    return solution.squeeze(-1)
