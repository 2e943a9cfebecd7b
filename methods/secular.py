"""Eigenvalues of all n principal minors (or all n rank-one downdates) of one symmetric matrix in
O(n³) instead of the O(n⁴) of n separate eigen-decompositions: secular equations.

Minors. With ``G = Q Λ Qᵀ`` (λ ascending) and ``G_c`` the minor without row and column c,
Cramer's rule gives ``det(G_c - μ) / det(G - μ) = [(G - μ)⁻¹]_cc = Σ_j Q_cj² / (λ_j - μ)``, so the
eigenvalues of ``G_c`` are the roots of ``f_c(μ) = Σ_j w_j / (λ_j - μ)`` (``w_j = Q_cj²``) plus the
poles the ratio cancels. f_c increases between poles (``f' = Σ w_j / (λ_j - μ)² ≥ 0``), from -∞
just right of a weighted pole to +∞ just left of the next, so each gap ``(λ_k, λ_{k+1})`` holds one
root: C - 1 gaps, C - 1 eigenvalues (Cauchy interlacing: the k-th lies in ``[λ_k, λ_{k+1}]``).

Downdates. ``Λ - z zᵀ`` (the pixel-side Gram matrix ``Aᵀ A`` less channel c's row ``a_c a_cᵀ``,
``z = Vᵀ a_c``): ``det(Λ - z zᵀ - μ) = det(Λ - μ) (1 - Σ_j z_j² / (λ_j - μ))``, so the roots of
``Σ_j z_j² / (λ_j - μ) = 1``: one in each gap, and one below λ_0 that is ≥ 0 because the
downdated matrix ``A_cᵀ A_c`` is positive semidefinite — a zero-weight pseudo-pole at
``min(0, λ_0)`` makes it a gap like the others. P gaps, P eigenvalues.

Degenerate cases need no special code. Read the root of a gap as the point where f crosses zero,
or the endpoint it tends to when f keeps one sign on the whole gap (f < 0: the right end, f > 0:
the left). A zero weight (a channel orthogonal to an eigenvector, duplicated or zero channels)
removes a pole: f is continuous through it, so that pole is an endpoint of the two gaps it splits
and exactly one of them ends on it — it stays an eigenvalue, as deflation says. A repeated
eigenvalue is a gap of zero width: it stays, with multiplicity one less. Sign-driven bracketing
finds exactly these generalised roots, so only the zero-width gaps are set directly.

Root finding, vectorised over every row and gap at once, in float64: the first evaluation is at
the gap's middle; its sign keeps the half holding the root and names the nearer pole. Each step
then solves the model ``c - a_l / (μ - λ_k) + a_r / (λ_{k+1} - μ)`` that keeps the nearer pole's
weight exact and matches f and f' (the fixed-weight method of LAPACK's dlaed4, a quadratic),
falling back to bisection when the model's root leaves the bracket. Distances to the poles are
kept as ``(λ_j - λ_k) - τ`` with τ the offset from the gap's left pole, so the poles at the ends
of a gap are never hit and the pole next to a root is at a distance known to full precision.
A root is done when a step moves it by at most ``_TOL`` (16 eps) of itself — below the
``eps·λ_max`` backward error of the eigen-decompositions either path starts from — or its bracket
is that narrow, or the observed quadratic contraction puts the next step there. Roots within
``P·eps·max|λ|`` of zero, below the round-off floor the nuclear norms apply, are only resolved to
that floor. About 3.5 evaluations per root on post-ReLU maps.

Evaluating f. Directly, O(P) per root and O(nP²) per sweep over all roots: a handful of sweeps
make the whole O(nP²), but with a large constant. So f is split per gap: the poles near the gap
(``±L`` of them, L the fewest that put the next pole at least ``1 / _RHO`` half-widths from the
gap's middle m) are summed exactly, and the far ones through their Taylor series about m,
``Σ_far w_j / (λ_j - μ) = Σ_t ((μ - m) / h)^t Σ_far w_j (h / (λ_j - m))^t / (λ_j - m)`` (h the
half-width, so ``|μ - m| ≤ h``): its coefficients for every row and gap are ``_TERMS`` matrix
products done once, and each ratio is at most ``_RHO``, so the truncation is below round-off
(``_RHO^_TERMS / (1 - _RHO) < eps``) relative to ``Σ |w_j / (λ_j - m)|``, the scale of f's own
rounding. The coefficients cost ``_TERMS`` O(nP²) matrix products (fast: BLAS), an evaluation
then O(L + _TERMS) per root. Gaps whose neighbourhood would need more than ``_NEAR_MAX`` poles a
side (next to an isolated large eigenvalue) are evaluated directly — the first sweep, at the gaps'
middles shared by all rows, as two matrix products too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

_EPS = torch.finfo(torch.float64).eps
_CHUNK = 1 << 20  # float64 elements per work buffer (8 MiB)
_MAX_STEPS = 200  # far above need: a bisection alone halves a gap to its tolerance in ~100
_TOL = 16 * _EPS  # a root is done within this of itself: below the ~eps·λ_max error of the spectra
_DENSE_WHILE = 2 / 3  # direct evaluation: every root in place (no gathering) while this share is open
_RHO = 1 / 6  # the largest ratio (μ - m) / (λ_j - m) a far pole may have in the expansion
_TERMS = 21  # 6^-21 / (5/6) < eps / 2
_NEAR_MAX = 16  # poles a side summed exactly, at most

Evaluator = Callable[[Tensor | None, Tensor], tuple[Tensor, Tensor]]


def _step(
    tau: Tensor,
    lo: Tensor,
    hi: Tensor,
    gap: Tensor,
    w_left: Tensor,
    w_right: Tensor,
    near_left: Tensor,
    base: Tensor,
    prev: Tensor,
    tiny: float,
    f: Tensor,
    fp: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One safeguarded fixed-weight step from offsets τ (``μ = λ_k + τ``) where f and f' are known.

    Returns the new τ, the bracket ``(lo, hi)`` shrunk by the sign of f, the step's size (inf for
    a bisection) and which roots are done: the step was within round-off, or it was a model step
    whose successor the observed quadratic contraction puts within round-off (``|η|³ / prev²``,
    with a factor 4 to spare) — that spares the evaluation which would only confirm it. The
    contraction is trusted only once steps are small beside the distances to both poles (after a
    step across half a wide gap, any next step would look "quadratic")."""
    lo = torch.where(f < 0, tau, lo)  # f increases: f < 0 puts the root to the right
    hi = torch.where(f > 0, tau, hi)
    dl, dr = tau, gap - tau  # distances to the left and right pole, both > 0
    # constant of the model fitted to f and f' with the near pole's weight exact (dlaed4's C)
    c = torch.where(near_left, f - dr * fp + w_left * gap / dl**2, f + dl * fp - w_right * gap / dr**2)
    # the model times -(dl + η)(dr - η) is c η² - b η + d, positive at η = -dl, negative at η = dr:
    # its root in the gap is the smaller one for c > 0 and the larger for c < 0, (b - √disc) / 2c
    b = (dr - dl) * f + dl * dr * fp
    d = -dl * dr * f
    root = (b * b - 4 * c * d).clamp(min=0).sqrt()
    eta = torch.where(b > 0, 2 * d / (b + root), (b - root) / (2 * c))
    new = tau + eta
    tol = _TOL * torch.maximum((base + new).abs(), new.abs()).clamp(min=tiny)
    converged = (f == 0) | (eta.abs() <= tol)  # a step within round-off may not move τ at all
    outside = ~((new > lo) & (new < hi)) & ~converged  # also NaN: a degenerate model
    new = torch.where(outside, 0.5 * (lo + hi), new)
    size = torch.where(outside, torch.inf, eta.abs())
    asymptotic = prev.isfinite() & (size <= 0.25 * prev) & (size <= 1e-3 * torch.minimum(new, gap - new))
    quadratic = asymptotic & (4 * size**3 <= tol * prev**2)
    done = converged | quadratic | (hi - lo <= tol)
    return torch.where(f == 0, tau, new), lo, hi, size, done


def _iterate(
    gap: Tensor,
    base: Tensor,
    w_left: Tensor,
    w_right: Tensor,
    tiny: float,
    evaluate: Evaluator,
    dense_while: float,
) -> Tensor:
    """The offsets τ of the roots (flat, in the evaluator's order) from the middle of each gap.

    ``evaluate(idx, τ)`` gives f and f' of the roots ``idx`` (None: all of them) at τ; it is asked
    for all of them while at least ``dense_while`` of them are open."""
    tau = 0.5 * gap
    lo, hi = torch.zeros_like(gap), gap.clone()
    done = gap <= _TOL * (base + gap).abs().clamp(min=tiny)  # ties: the shared eigenvalue
    fresh = ~done  # not yet evaluated: at the middle of the gap
    near_left = torch.zeros_like(done)
    prev = torch.full_like(gap, torch.inf)  # the size of each root's previous model step
    for _ in range(_MAX_STEPS):
        open_ = int((~done).sum())
        if open_ == 0:
            break
        sel = slice(None) if open_ >= dense_while * len(gap) else (~done).nonzero().squeeze(1)
        f, fp = evaluate(None if isinstance(sel, slice) else sel, tau[sel])
        near = torch.where(fresh[sel], f > 0, near_left[sel])  # f(middle) > 0: the root is left
        new, lo_, hi_, size, fin = _step(
            *(x[sel] for x in (tau, lo, hi, gap, w_left, w_right)), near, base[sel], prev[sel], tiny, f, fp
        )
        keep = done[sel]
        tau[sel], prev[sel] = torch.where(keep, tau[sel], new), size
        lo[sel], hi[sel] = torch.where(keep, lo[sel], lo_), torch.where(keep, hi[sel], hi_)
        near_left[sel], fresh[sel], done[sel] = near, False, keep | fin
    return tau


def _evaluate_rows(delta: Tensor, sqrt_w: Tensor, kappa: float) -> tuple[Tensor, Tensor]:
    """f and f' from the distances ``δ = λ_j - μ`` ``[..., m, P]`` and ``√w`` ``[..., 1, P]``.

    ``s = √w / δ`` gives ``f = s · √w - κ`` and ``f' = s · s``: two passes over δ (overwritten),
    two reads."""
    s = delta.reciprocal_().mul_(sqrt_w)  # torch's float64 division is ~4x slower than these two
    f = (s @ sqrt_w.transpose(-1, -2)).squeeze(-1) - kappa
    fp = torch.linalg.vector_norm(s, dim=-1).square()
    return f.reshape(-1), fp.reshape(-1)


def _direct(poles: Tensor, left: Tensor, dist: Tensor, sqrt_w: Tensor, kappa: float) -> Evaluator:
    """Evaluate f over all P poles for roots flat over (row, gap), the gaps' left poles ``left``
    (``dist[g, j] = λ_j - λ_g``); the first call (every root at its gap's middle) is two matrix
    products, the middles being shared by all rows."""
    rows, p = sqrt_w.shape
    g = dist.shape[0]
    base = left[:, None]
    buffer = poles.new_empty(max(_CHUNK, g * p))  # reused: fresh pages cost more than the work
    first = [True]

    def evaluate(idx: Tensor | None, tau: Tensor) -> tuple[Tensor, Tensor]:
        if first[0] and idx is None:
            first[0] = False
            inv = (dist - tau[:g, None]).reciprocal_()  # [G, P]; inf only in a zero-width gap's row
            w = sqrt_w.square()
            return (w @ inv.T).reshape(-1) - kappa, (w @ inv.square_().T).reshape(-1)
        f, fp = torch.empty_like(tau), torch.empty_like(tau)
        if idx is None:  # every root of a block of rows in place
            step = max(1, _CHUNK // (g * p))
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                out = buffer[: (r1 - r0) * g * p].view(-1, g, p)
                delta = torch.sub(dist, tau[r0 * g : r1 * g].view(-1, g, 1), out=out)
                f[r0 * g : r1 * g], fp[r0 * g : r1 * g] = _evaluate_rows(delta, sqrt_w[r0:r1, None, :], kappa)
            return f, fp
        step = max(1, _CHUNK // p)
        for i0 in range(0, len(idx), step):  # the open roots, their rows gathered
            i = idx[i0 : i0 + step]
            delta = torch.sub(poles, base[i % g], out=buffer[: len(i) * p].view(-1, p))
            delta = delta.sub_(tau[i0 : i0 + step, None])[:, None, :]  # (λ_j - λ_g) - τ, as dist
            f[i0 : i0 + step], fp[i0 : i0 + step] = _evaluate_rows(delta, sqrt_w[i // g][:, None, :], kappa)
        return f, fp

    return evaluate


def _near_reach(dist: Tensor, half: Tensor) -> Tensor:
    """``[G]``: for each gap the fewest poles a side, L, whose exclusion leaves every other pole at
    least ``h / _RHO`` from the gap's middle; 0 where ``_NEAR_MAX`` do not suffice."""
    g, p = dist.shape
    ks = torch.arange(g, device=dist.device)
    reach = torch.zeros(g, dtype=torch.long, device=dist.device)
    for n in range(_NEAR_MAX, 0, -1):  # downwards: the last that works is the fewest
        left, right = ks - n, ks + n + 1
        d_left = torch.where(left >= 0, half - dist[ks, left.clamp(min=0)], torch.inf)
        d_right = torch.where(right < p, dist[ks, right.clamp(max=p - 1)] - half, torch.inf)
        reach = torch.where(half <= _RHO * torch.minimum(d_left, d_right), n, reach)
    return reach


def _expanded(
    gaps: Tensor, dist: Tensor, half: Tensor, reach: Tensor, w_t: Tensor, kappa: float
) -> Evaluator:
    """Evaluate f for roots flat over (gap, row) — gaps ``gaps`` (left pole indices) with ``dist``'s
    rows, half-widths ``half`` and reach L as ``_near_reach``, weights ``w_t`` ``[P, R]`` — the near
    poles exactly, the far ones by their series."""
    g, p = dist.shape
    rows = w_t.shape[1]
    width = int(reach.max())
    offsets = torch.arange(-width + 1, width + 1, device=dist.device)
    window = gaps[:, None] + offsets  # [G, 2L]: k - L + 1 .. k + L
    near_idx = window.clamp(0, p - 1)
    in_reach = (offsets > -reach[:, None]) & (offsets <= reach[:, None]) & (window >= 0) & (window < p)
    near_dist = dist.gather(1, near_idx)  # λ_j - λ_k
    near_w = w_t[near_idx] * in_reach[:, :, None]  # [G, 2L, R]; weight 0 pads the window
    far = torch.ones(g, p, dtype=torch.bool, device=dist.device)
    far.scatter_(1, torch.where(in_reach, near_idx, gaps[:, None]), False)  # pads repeat pole k
    inv = torch.where(far, (dist - half[:, None]).reciprocal(), 0)  # 1 / (λ_j - m), far poles only
    ratio = inv * half[:, None]  # h / (λ_j - m), at most _RHO
    kernels = torch.empty(_TERMS, g, p, dtype=dist.dtype, device=dist.device)
    kernels[0] = inv
    for t in range(1, _TERMS):
        torch.mul(kernels[t - 1], ratio, out=kernels[t])
    coef = (kernels.view(_TERMS * g, p) @ w_t).view(_TERMS, g * rows)  # term t of root (k, r)
    halves = half.repeat_interleave(rows)

    def evaluate(idx: Tensor | None, tau: Tensor) -> tuple[Tensor, Tensor]:
        if idx is None:  # every root: the gaps' data broadcast over the rows
            inv_near = (near_dist[:, :, None] - tau.view(g, 1, rows)).reciprocal_()
            terms = near_w * inv_near
            f, fp = terms.sum(1).view(-1), terms.mul_(inv_near).sum(1).view(-1)
            c, h = coef, halves
        else:
            inv_near = (near_dist[idx // rows] - tau[:, None]).reciprocal_()
            terms = near_w[idx // rows, :, idx % rows] * inv_near
            f, fp = terms.sum(-1), terms.mul_(inv_near).sum(-1)
            c, h = coef[:, idx], halves[idx]
        x = (tau - h) / h  # (μ - m) / h, in [-1, 1]
        acc, dacc = c[-1].clone(), torch.zeros_like(tau)
        for t in range(_TERMS - 2, -1, -1):  # Horner, with the derivative alongside
            dacc = torch.addcmul(acc, dacc, x)
            acc = torch.addcmul(c[t], acc, x)
        return f.add_(acc).sub_(kappa), fp.add_(dacc.div_(h))

    return evaluate


def secular_roots(poles: Tensor, sqrt_weights: Tensor, kappa: float = 0.0) -> Tensor:
    """``[R, P - 1]``: in each gap ``[λ_k, λ_{k+1}]`` of the ascending ``poles`` ``[P]``, the root of
    ``f_r(μ) = Σ_j w_rj / (λ_j - μ) - κ`` for every row r of ``sqrt_weights = √w`` ``[R, P]``.

    A gap where f_r keeps one sign gives the endpoint it tends to (see the module docstring): with
    these generalised roots, the result is the spectrum of the minor (κ = 0, ``√w`` a row of Q) or
    of the downdate (κ = 1, a zero-weight pseudo-pole first), ascending.
    """
    poles = poles.to(torch.float64)
    sqrt_w = sqrt_weights.to(torch.float64).abs().contiguous()  # eigh returns Q column-major
    rows, p = sqrt_w.shape
    k = p - 1
    out = poles[:k].expand(rows, k).clone() if k > 0 else poles.new_empty(rows, 0)
    if k <= 0 or rows == 0:
        return out
    dist = (poles[None, :] - poles[:, None])[:k]  # [K, P]: λ_j - λ_k, exact near the diagonal
    gap = dist.diagonal(offset=1)
    tiny = p * _EPS * float(poles.abs().max())
    reach = _near_reach(dist, 0.5 * gap)
    w = sqrt_w.square()
    w_t = w.T.contiguous()
    expandable = (reach > 0).nonzero().squeeze(1)
    expandable = expandable[reach[expandable].argsort(stable=True)]  # blocks of like reach: narrow
    block = max(1, _CHUNK // (_TERMS * max(p, rows)))
    for g0 in range(0, len(expandable), block):  # roots flat over (gap, row)
        ks = expandable[g0 : g0 + block]
        evaluate = _expanded(ks, dist[ks], 0.5 * gap[ks], reach[ks], w_t, kappa)
        flat = (gap[ks], poles[ks], w_t[ks].reshape(-1), w_t[ks + 1].reshape(-1))
        tau = _iterate(*(x.repeat_interleave(rows) for x in flat[:2]), *flat[2:], tiny, evaluate, 0.5)
        out[:, ks] += tau.view(len(ks), rows).T
    ks = (reach == 0).nonzero().squeeze(1)
    if len(ks):  # roots flat over (row, gap)
        evaluate = _direct(poles, poles[ks], dist[ks], sqrt_w, kappa)
        flat = (gap[ks].repeat(rows), poles[ks].repeat(rows), w[:, ks].reshape(-1), w[:, ks + 1].reshape(-1))
        out[:, ks] += _iterate(*flat, tiny, evaluate, _DENSE_WHILE).view(rows, len(ks))
    return out


@contextmanager
def lapack_single_thread() -> Iterator[None]:
    """Batched small eigen-decompositions run ~100x slower with 2 threads than with 1 here
    (LAPACK's threads fight over tiny matrices), so they run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def minor_spectra(gram: Tensor) -> tuple[Tensor, Tensor]:
    """``(λ [C], μ [C, C-1])``: the spectrum of the symmetric ``gram`` and, row c, that of its
    principal minor without row and column c (ascending) — one eigh (on one thread) and C secular
    equations (on all: large element-wise work and matrix products)."""
    with lapack_single_thread():
        lam, q = torch.linalg.eigh(gram.to(torch.float64))
    return lam, secular_roots(lam, q.abs())


def downdate_spectra(gram: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """``(λ [P], μ [C, P])``: the spectrum of ``gram = Aᵀ A`` (P x P) and, row c, that of
    ``gram - a_c a_cᵀ`` for each row ``a_c`` of ``rows = A`` ``[C, P]`` — one eigh and C secular
    equations ``Σ_j z_j² / (λ_j - μ) = 1`` with ``z = Vᵀ a_c``."""
    with lapack_single_thread():
        lam, v = torch.linalg.eigh(gram.to(torch.float64))
    z = rows.to(torch.float64) @ v  # [C, P]
    poles = torch.cat([lam[:1].clamp(max=0), lam])  # the pseudo-pole below the lowest root
    sqrt_w = torch.cat([z.new_zeros(z.shape[0], 1), z.abs()], dim=1)
    return lam, secular_roots(poles, sqrt_w, kappa=1.0)
