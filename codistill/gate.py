"""The benefit gate: does the soft term make *this* student better on data it has not seen?

A student's update follows g_α = ∇[(1−α)·CE + α·T²·D] = g_0 + α·g_d on its training batch
(g_0 = ∇CE, g_d = ∇(T²·D − CE): the blended loss is linear in α). Its CE on data it has not
seen falls by as much as the update points along that data's gradient g_p. With an update
of fixed length, as Adam's and a clipped step nearly are, the fall is proportional to the
cosine between g_p and g_α, so the gate follows the cosine's derivative in α:

    s = d/dα cos(g_p, g_α) = [⟨g_p, g_d⟩ − ⟨g_p, g_α⟩·⟨g_α, g_d⟩ / ‖g_α‖²] / (‖g_p‖·‖g_α‖)

Positive: more α turns the update towards the held-out gradient. The first term alone is the
one-step hypergradient of plain gradient descent (Baydin et al. 2018); it only sees the
teacher's *bias* (where teacher and student err alike it says "less α"), not that the
teacher's targets are less noisy than one-hot labels, which is most of what distillation
buys. The second term is that: a soft term that makes g_α shorter (less label noise) for
the same progress along g_p raises the cosine.

The probe batch g_p comes from is the next micro-batch of the training stream, taken before
any model has seen it (so nothing is set aside). Each rank measures its own batches; the
five inner products are averaged over ranks. The update's own products (⟨g_α, g_d⟩, ‖g_α‖²)
must be those of the step, which averages ranks x accumulation micro-batches and so holds
less label noise than one: with several ranks the ranks' gradients are summed too, which
separates noise from signal (see :func:`step_products`). On one rank with gradient
accumulation they stay one micro-batch's, and the gate favours the soft term somewhat more
than it should.

The gate keeps an openness o ∈ [0, 1] per student, by which the schedule's α (the
teacher-lead schedule, warm-up or constant) is multiplied. The evidence is a t-statistic with
forgetting, t = S/√Q with S = Σ decay^k·s and Q = Σ decay^k·s² over the measurements (k
measurements ago): for a signal that is only noise, t has mean 0 and variance 1/(1+decay);
for one that always points the same way it grows to √(1/(1−decay)) (3.2 at decay 0.9).
o = clip(init + gain·t, 0, 1): noise leaves α near init·(the schedule's),
a consistent "helps" opens it fully, a consistent "hurts" shuts it, and the forgetting lets
it change its mind when training moves on.

With ``benefit_length: lr`` the length term is weighted by the student's learning rate over its
peak so far: what less label noise buys shrinks with the step (a small step averages noise over
many steps anyway), while the teacher's pull on where training ends does not. The key's default
is ``constant``; the co-distillation configs set ``lr``, measured across corpora and seeds
(docs/results.md, section 5).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from .schedules import lr_fraction


@dataclass
class BenefitState:
    """One student's gate, saved in every checkpoint."""

    openness: float
    evidence_sum: float = 0.0  # S = Σ decay^k·s
    evidence_sq: float = 0.0  # Q = Σ decay^k·s²
    measurements: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> "BenefitState":
        """(An earlier release's form also held a peak learning rate: the student's state keeps it now.)"""
        return cls(openness=float(state["openness"]), evidence_sum=float(state["evidence_sum"]),
                   evidence_sq=float(state["evidence_sq"]), measurements=int(state["measurements"]))

    @property
    def evidence(self) -> float:
        """t = S/√Q; 0 before any measurement."""
        return self.evidence_sum / math.sqrt(self.evidence_sq) if self.evidence_sq > 0 else 0.0


def update(state: BenefitState, signal: float, init: float, gain: float, decay: float) -> BenefitState:
    """The gate after one measurement whose (rank-averaged) signal is ``signal``."""
    new = BenefitState(state.openness, decay * state.evidence_sum + signal,
                       decay * state.evidence_sq + signal * signal, state.measurements + 1)
    new.openness = min(1.0, max(0.0, init + gain * new.evidence))
    return new


TERMS = ("probe_diff", "probe_update", "update_diff", "update_sq", "probe_sq")
SUMMED = ("update_diff_all", "update_sq_all")  # with several ranks: the products of the ranks' summed gradients


def step_products(terms: dict[str, float], world: int, batches: int) -> tuple[float, float]:
    """⟨g_α, g_d⟩ and ‖g_α‖² of the step's gradient, averaged over ``batches`` micro-batches.

    One micro-batch's products hold its noise in full, the step's 1/batches of it. With several
    ranks the noise-free part is the mean over pairs of different ranks (different batches),
    M = (⟨Σg_α, Σg_d⟩ − world·L) / (world·(world − 1)) with L the ranks' mean own product, and the
    step's product is M + (L − M)/batches (exactly the rank-averaged gradients' product when every
    rank takes one micro-batch per step). On one rank nothing separates noise from signal: the
    micro-batch's own products are used.
    """
    diff, square = terms["update_diff"], terms["update_sq"]
    if world > 1 and all(key in terms for key in SUMMED):
        pairs = world * (world - 1)
        cross_diff = (terms["update_diff_all"] - world * diff) / pairs
        cross_square = (terms["update_sq_all"] - world * square) / pairs
        diff = cross_diff + (diff - cross_diff) / batches
        square = cross_square + (square - cross_square) / batches
    return diff, square


def signal_parts(terms: dict[str, float], world: int = 1, batches: int = 1) -> tuple[float, float]:
    """The two terms of d/dα cos(g_p, g_α), from the (rank-averaged) inner products, for a step over
    ``batches`` micro-batches on ``world`` ranks: the teacher's pull along the held-out gradient,
    ⟨g_p, g_d⟩/(‖g_p‖‖g_α‖) (the plain one-step hypergradient, scaled), and what the soft term does to
    the update's length, −⟨g_p, g_α⟩⟨g_α, g_d⟩/(‖g_α‖²‖g_p‖‖g_α‖). (0, 0) when a gradient vanishes."""
    update_diff, update_sq = step_products(terms, world, batches)
    norms = math.sqrt(max(terms["probe_sq"], 0.0) * max(update_sq, 0.0))
    if norms <= 0:
        return 0.0, 0.0
    return terms["probe_diff"] / norms, -terms["probe_update"] * update_diff / update_sq / norms


def length_weight(mode: str, lr: float, lr_peak: float) -> float:
    """The length term's weight: 1 (``constant``), or the learning rate over its peak (``lr``)."""
    return 1.0 if mode == "constant" else lr_fraction(lr, lr_peak)


def signal(terms: dict[str, float], world: int = 1, batches: int = 1) -> float:
    """d/dα cos(g_p, g_α) (see :func:`signal_parts`); 0 when a gradient vanishes."""
    return sum(signal_parts(terms, world, batches))


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every trainable parameter once (a tied embedding and head is one parameter)."""
    return [p for p in module.parameters() if p.requires_grad]


SLICE = 1 << 22  # elements of a parameter's gradients converted to fp64 at a time (32 MB each)


def _slices(*grads: Optional[torch.Tensor]):
    """The gradients of one parameter, ``SLICE`` elements at a time, in fp64 (zeros for None)."""
    ref = next(g for g in grads if g is not None)
    flat = [None if g is None else g.detach().reshape(-1) for g in grads]
    for start in range(0, ref.numel(), SLICE):
        stop = min(ref.numel(), start + SLICE)
        yield tuple(torch.zeros(stop - start, dtype=torch.float64, device=ref.device) if f is None
                    else f[start:stop].double() for f in flat)


def hypergradient_terms(params: list[torch.nn.Parameter], alpha: float,
                        losses: Callable[[bool, bool], tuple[Optional[torch.Tensor], Optional[torch.Tensor]]],
                        probe_ce: Callable[[], torch.Tensor],
                        sum_over_ranks: Optional[Callable[[torch.Tensor], None]] = None,
                        separate: bool = False) -> dict[str, float]:
    """The inner products of :data:`TERMS` over ``params``, in fp64; with ``sum_over_ranks`` (an
    in-place all-reduce, called in the same order on every rank) also those of :data:`SUMMED`,
    for :func:`step_products`.

    ``losses(want_ce, want_soft)`` builds from one forward the training batch's CE (if ``want_ce``) and
    its T²·D (if ``want_soft``; the blended loss at α = 1: its gradient less ∇CE is g_d, the blended loss's
    derivative in α, and at α the update is g_0 + α·g_d), None or anything for the one not asked
    for; ``probe_ce()`` the unseen batch's CE; each graph is
    built, differentiated and freed in turn. The gradients come from ``torch.autograd.grad``:
    nothing is accumulated into ``.grad``. With ``separate`` (ZeRO-3, whose backward partitions the
    weights a graph saved, so a graph is differentiated once) ``losses`` is called twice, one forward
    per gradient and one loss each, the second from the random state the first started from (the same
    dropout masks).
    At most two whole gradients are held (g_p, then g_0):
    ∇(T²·D) is folded into the products (as g_d = it − g_0) one parameter at a time as autograd produces it, and what
    autograd collects in its place is a zero that holds no memory; with ranks, a bucket of at most ``SLICE`` elements
    of (g_0, g_d) in fp64 waits for one all-reduce.
    """
    g_p, g_0, soft = _probe_and_ce_gradients(params, losses, probe_ce, separate)
    first = _first_products(g_p, g_0)
    products = _SoftProducts(g_p, g_0, sum_over_ranks)
    seen = _fold_soft_gradient(soft, params, products)
    del soft
    for i in range(len(params)):  # parameters T²·D does not reach: g_d = −g_0 (in the same order on every rank)
        if i not in seen and first[i] is not None:
            products.fold(i, None)
    if sum_over_ranks is not None:
        products.flush()
    return _terms(first, products.later, alpha, sum_over_ranks is not None)


def _probe_and_ce_gradients(params: list[torch.nn.Parameter],
                            losses: Callable[[bool, bool], tuple[Optional[torch.Tensor], Optional[torch.Tensor]]],
                            probe_ce: Callable[[], torch.Tensor], separate: bool):
    """g_p (the probe batch's CE gradient) and g_0 (the training batch's), one tensor or None per parameter,
    and the training batch's T²·D with its graph, not yet differentiated (see :func:`hypergradient_terms`)."""
    g_p = torch.autograd.grad(probe_ce(), params, allow_unused=True)
    if separate:  # the random state goes back after this forward: the second draws its dropout masks again
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            hard = losses(True, False)[0]
    else:
        hard, soft = losses(True, True)
    g_0 = torch.autograd.grad(hard, params, retain_graph=not separate, allow_unused=True)
    del hard
    if separate:
        soft = losses(False, True)[1]
    return g_p, g_0, soft


def _first_products(g_p, g_0) -> list[Optional[torch.Tensor]]:
    """Per parameter, [Σ p·z, Σ z·z, Σ p·p] (z = g_0) in fp64, a slice at a time (no fp64 copy of a whole
    vocabulary-sized head); None for a parameter neither gradient reaches."""
    first: list[Optional[torch.Tensor]] = [None] * len(g_p)
    for i, (p, z) in enumerate(zip(g_p, g_0)):
        if p is not None or z is not None:
            rows = [torch.stack([(pc * zc).sum(), (zc * zc).sum(), (pc * pc).sum()]) for pc, zc in _slices(p, z)]
            first[i] = torch.stack(rows).sum(0)
    return first


class _SoftProducts:
    """The products with g_d, folded in as ∇(T²·D) arrives (d = ∇(T²·D) − z, z = g_0), each in fp64 a slice of
    a parameter at a time: ``later[0]`` = [Σ p·d, Σ z·d, Σ d·d] of this rank; with ``sum_over_ranks``,
    ``later[1]`` = [⟨Σz, Σd⟩, ‖Σd‖², ‖Σz‖²] of the ranks' summed gradients. The ranks' sums go in buckets of at
    most SLICE elements (one all-reduce for many small parameters), filled in the order autograd produces the
    gradients, which is the same on every rank."""

    def __init__(self, g_p, g_0, sum_over_ranks: Optional[Callable[[torch.Tensor], None]]):
        self.g_p, self.g_0, self.sum_over_ranks = g_p, g_0, sum_over_ranks
        self.later: list[Optional[torch.Tensor]] = [None, None]  # this rank's products, the summed gradients'
        self.bucket: list[torch.Tensor] = []  # [2, n] slices (z, d) waiting for the ranks' sum

    def add(self, slot: int, products: torch.Tensor) -> None:
        self.later[slot] = products if self.later[slot] is None else self.later[slot] + products

    def flush(self) -> None:
        """Sum the waiting bucket over the ranks and add its products."""
        if self.bucket:
            both = torch.cat(self.bucket, dim=1)
            self.bucket.clear()
            self.sum_over_ranks(both)
            self.add(1, torch.stack([(both[0] * both[1]).sum(), (both[1] * both[1]).sum(),
                                     (both[0] * both[0]).sum()]))

    def fold(self, i: int, g_soft: Optional[torch.Tensor]) -> None:
        """Fold in parameter ``i``'s ∇(T²·D) (None: zero)."""
        for pc, zc, sc in _slices(self.g_p[i], self.g_0[i], g_soft):
            dc = sc - zc  # g_d = ∇(T²·D) − ∇CE
            self.add(0, torch.stack([(pc * dc).sum(), (zc * dc).sum(), (dc * dc).sum()]))
            if self.sum_over_ranks is not None:
                if self.bucket and sum(b.shape[1] for b in self.bucket) + dc.numel() > SLICE:
                    self.flush()  # a bucket holds at most SLICE elements of each, as one slice did
                self.bucket.append(torch.stack([zc, dc]))


def _fold_soft_gradient(soft: torch.Tensor, params: list[torch.nn.Parameter], products: _SoftProducts) -> set[int]:
    """Differentiate ``soft``, folding each parameter's gradient into ``products`` as autograd produces it (what
    autograd collects instead is a zero that holds no memory); the indices of the parameters it reached."""
    seen = set()

    def hook_for(i: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            seen.add(i)
            products.fold(i, grad)
            return torch.zeros((), dtype=grad.dtype, device=grad.device).expand_as(grad)  # nothing to collect
        return hook

    handles = [param.register_hook(hook_for(i)) for i, param in enumerate(params)]
    try:
        torch.autograd.grad(soft, params, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _terms(first: list[Optional[torch.Tensor]], later: list[Optional[torch.Tensor]], alpha: float,
           summed: bool) -> dict[str, float]:
    """The terms at α from the products of g_0 (``first``) and of g_d (``later``); zeros when there are none."""
    firsts = [f for f in first if f is not None]
    if not firsts or later[0] is None:
        return dict.fromkeys(TERMS + (SUMMED if summed else ()), 0.0)
    pz, zz, pp = torch.stack(firsts).sum(0).tolist()
    pd, zd, dd = later[0].tolist()
    out = {"probe_diff": pd, "probe_update": pz + alpha * pd, "update_diff": zd + alpha * dd,
           "update_sq": zz + 2 * alpha * zd + alpha * alpha * dd, "probe_sq": pp}
    if summed:
        zd_all, dd_all, zz_all = later[1].tolist()
        out["update_diff_all"] = zd_all + alpha * dd_all
        out["update_sq_all"] = zz_all + 2 * alpha * zd_all + alpha * alpha * dd_all
    return out
