"""Compressed, curvature-aware per-sequence gradients: score new queries with a matrix product.

In a module's eigenbasis the EK-FAC score is a sum over coordinates (see curvature.base):

    <P_q, DW_z> = sum_ij  c_q[ij] g_z[ij],   g_z = Q_S^T DW_z Q_A,   c_q = (Q_S^T G_q Q_A) / (Lambda + damping)

with G_q the query's gradient, so P_q = Q_S c_q Q_A^T. Two ways to keep K numbers per sequence:

- `top`: the K coordinates with the largest eigenvalues, the same for every sequence. Lambda_ij
  is the mean of g_z[ij]^2 over the fitted corpus, so a coordinate's share of a score is about
  Lambda / (Lambda + damping): the kept ones carry most of it, and with K = O x I the index score
  is the exact score. The index ranks coordinates by the K-FAC eigenvalues eig_S[i] eig_A[j]
  (known after the covariance pass) rather than by the corrected Lambda: on the embedded default
  both selections agree to 0.001 in Spearman at every K (benchmarks/README.md), and the index
  then depends on the factors' eigenbases only, not on the corrected eigenvalues or the damping.
  Stored in float16 with one scale per sequence and module (raw values reach 1e5).
- `projection`: seeded Gaussian sketches R_S [O, k_s], R_A [I, k_a] (K = k_s k_a), as LoGra does:
  g_z ~ R_S^T DW_z R_A, c_q ~ R_S^T P_q R_A; unbiased, but its error falls only as 1/sqrt(K).
- `sparse`: each sequence keeps its own K largest whitened coordinates u_z = g_z / sqrt(Lambda +
  damping), with their indices; the score is sum_k v_q[idx_zk] u_z[k], v_q = c_q sqrt(Lambda +
  damping). The best K-term approximation of each sequence: the error is at most |v_q| times the
  norm of what the sequence drops.

The index stores, per module, an exact head (the `top` coordinates, K of them: 0 by default, all
of them for exact scores) and a sketch of the rest, the tail T, that makes the score an unbiased
estimate whatever the byte budget:

    score = sum_H c_q g_z  +  <S(c_q w), S(g_z / w)>,   restricted to T in the sketch

S is a CountSketch (m buckets; coordinate j goes to bucket h(j) with sign sigma(j), both from
4-wise independent polynomial hashes of a seed), so E_S[<S x, S y>] = <x, y> for any x, y, and the
error's variance is about |x|^2 |y|^2 / m. Any positive weights w keep the estimate unbiased; the
variance is smallest when both sides are equally spread, which the whitening
w = sqrt(eig_S eig_A + 0.1 mean(eig_S eig_A)) does in expectation: the K-FAC eigenvalues are the
mean of g_z^2 and the query's c_q scales as 1 / (curvature + damping). They are known after the
covariance pass, so the eigenvalue pass can write the index. The sketch's entries are stored in 4
bits, rounded up or down at random (a hashed dither, the same on every run) so that rounding is
unbiased too: at equal bytes four times as many buckets as float16 entries, for 1 % more variance
per entry. A module's share of the sketch bytes follows its effective dimension,
sum over T of k / (k + 0.1 mean k), k = eig_S eig_A, the number of directions its gradients spread over.

Within a module's m buckets, the first p hold one coordinate each: the tail's p largest K-FAC
eigenvalues, whose whitened values carry a share e = k / (k + 0.1 mean k) near 1 of a gradient's
expected square. They never collide, so the CountSketch of the remaining coordinates has their
energy only: the variance (sum of e past p)^2 / (m - p) is smallest at the p that
_private_buckets finds (what it gains: benchmarks/README.md, "Gradient index"). Private buckets are rounded with a scale of their
own, since single coordinates are heavier-tailed than the sums the other buckets hold.

Bases are dense or blocked (curvature.base.basis_right takes either). Tensors in, tensors out; no files.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from infl.curvature.base import basis_left, basis_right

__all__ = [
    "top_coordinates",
    "index_coordinates",
    "eigen_coordinates",
    "rotated_gradients",
    "query_coordinates",
    "low_rank_query_coordinates",
    "encode",
    "index_scores",
    "projections",
    "projected_gradients",
    "projected_queries",
    "sparse_coordinates",
    "sparse_scores",
    "SKETCH_LEVELS",
    "ModuleSketch",
    "module_sketch",
    "sketch_sizes",
    "index_rows",
    "sketch_queries",
    "quantize",
    "dequantize",
    "sketch_scores",
]


def top_coordinates(Lambda: Tensor, k: int) -> Tensor:
    """Flat indices (row-major over [O, I]) of the k largest eigenvalues, ascending (ties: lower index)."""
    flat = Lambda.reshape(-1).double()
    k = min(k, flat.numel())
    if k in (0, flat.numel()):  # none or all: no sort of a million eigenvalues per module
        return torch.arange(k, dtype=torch.int64, device=flat.device)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def index_coordinates(eig_S: Tensor, eig_A: Tensor, k: int) -> Tensor:
    """The index's k coordinates of a module: the largest K-FAC eigenvalues eig_S[i] eig_A[j]."""
    return top_coordinates(torch.outer(eig_S.double(), eig_A.double()), k)


def eigen_coordinates(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor, flat: Tensor) -> Tensor:
    """(Q_S^T DW_b Q_A) at the flat indices, for every sequence b: a: [B, T, I], s: [B, T, O]
    (zero on padding) -> [B, K]. The rotated gradient is formed whole with one batched GEMM
    (2T(O b_S + I b_A) + 2TOI flops per sequence, b_S, b_A the bases' block sizes: O, I when dense),
    then gathered: gathering token products coordinate by coordinate costs fewer flops but runs far slower."""
    return rotated_gradients(a, s, Q_A, Q_S)[:, flat]


def rotated_gradients(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor) -> Tensor:
    """g_b = Q_S^T DW_b Q_A of every sequence, flattened row-major: a: [B, T, I], s: [B, T, O] -> [B, O I]."""
    return (basis_right(s, Q_S.to(s.dtype)).transpose(1, 2) @ basis_right(a, Q_A.to(a.dtype))).flatten(1)


def query_coordinates(P: Tensor, Q_A: Tensor, Q_S: Tensor, flat: Tensor) -> Tensor:
    """c_q = Q_S^T P_q Q_A at the flat indices, from preconditioned queries P: [Q, O, I] -> [Q, K]."""
    x = basis_right(basis_left(Q_S.mT.to(torch.float64), P.to(torch.float64)), Q_A.to(torch.float64))
    return x.flatten(1)[:, flat].to(P.dtype)


def low_rank_query_coordinates(U: Tensor, sigma: Tensor, V: Tensor, Q_A: Tensor, Q_S: Tensor, flat: Tensor) -> Tensor:
    """c_q = Q_S^T U diag(sigma) V^T Q_A at the flat indices, from rank-R queries (U: [Q, O, R],
    sigma: [Q, R], V: [Q, I, R]) -> [Q, K], without forming [Q, O, I] when K R is smaller."""
    O, I, R = U.shape[1], V.shape[1], U.shape[2]
    if len(flat) == O * I:  # every coordinate (the sketch's queries): batched products in U's dtype
        left = basis_left(Q_S.mT.to(U.dtype), U) * sigma.to(U.dtype)[:, None, :]
        return (left @ basis_left(Q_A.mT.to(V.dtype), V).mT).flatten(1)[:, flat]
    left = basis_left(Q_S.mT.to(torch.float64), U.to(torch.float64)) * sigma.to(torch.float64)[:, None, :]  # [Q, O, R]
    right = basis_left(Q_A.mT.to(torch.float64), V.to(torch.float64))  # [Q, I, R]
    rows, cols = flat // I, flat % I
    out = torch.empty(U.shape[0], len(flat), dtype=torch.float64, device=U.device)
    for q in range(U.shape[0]):  # one query at a time: [K, R] or [O, I] at most
        if len(flat) * R < O * I:
            out[q] = (left[q, rows] * right[q, cols]).sum(1)
        else:
            out[q] = (left[q] @ right[q].T).flatten()[flat]
    return out.to(U.dtype)


def encode(values: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rows of `values` [B, K] as (values / scale in `dtype`, scale [B] float32), scale = each row's
    largest magnitude, so that float16 holds gradients of any size (an all-zero row has scale 1)."""
    scale = values.abs().amax(1).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (values / scale[:, None].to(values.dtype)).to(dtype), scale


def index_scores(c: Tensor, values: Tensor, scale: Tensor) -> Tensor:
    """sum_k c[q, k] values[z, k] scale[z]: queries c [Q, K], encoded rows values [N, K] with
    their scales [N] -> [Q, N] (in c's dtype)."""
    return (c @ values.to(c.dtype).T) * scale.to(c.dtype)


def projections(shape: tuple[int, int], k_s: int, k_a: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded Gaussian sketches R_S [O, k_s], R_A [I, k_a] with E[R R^T] = identity."""
    O, I = shape
    generator = torch.Generator().manual_seed(seed)
    R_S = torch.randn(O, k_s, generator=generator, dtype=torch.float64) / k_s**0.5
    R_A = torch.randn(I, k_a, generator=generator, dtype=torch.float64) / k_a**0.5
    return R_S, R_A


def projected_gradients(a: Tensor, s: Tensor, R_A: Tensor, R_S: Tensor) -> Tensor:
    """R_S^T DW_b R_A for every sequence, flattened: a: [B, T, I], s: [B, T, O] -> [B, k_s k_a]."""
    return ((s @ R_S.to(s.dtype)).transpose(1, 2) @ (a @ R_A.to(a.dtype))).flatten(1)


def projected_queries(P: Tensor, R_A: Tensor, R_S: Tensor) -> Tensor:
    """R_S^T P_q R_A, flattened: P: [Q, O, I] -> [Q, k_s k_a]."""
    return (R_S.T.to(P.dtype) @ P @ R_A.to(P.dtype)).flatten(1)


def sparse_coordinates(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor, whiten: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each sequence's k largest whitened eigenbasis coordinates: values [B, k] and flat indices
    [B, k] (by decreasing magnitude). `whiten`: [O, I] = (Lambda + damping)^-1/2."""
    u = rotated_gradients(a, s, Q_A, Q_S) * whiten.reshape(-1).to(a.dtype)
    indices = u.abs().topk(min(k, u.shape[1]), dim=1).indices
    return u.gather(1, indices), indices


def sparse_scores(v: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """sum_k v[q, indices[z, k]] values[z, k]: v [Q, D], values and indices [N, k] -> [Q, N], as
    one sparse (CSR) x dense product."""
    N, k = values.shape
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product we use is stable
        warnings.simplefilter("ignore")
        rows = torch.sparse_csr_tensor(
            torch.arange(0, N * k + 1, k, device=v.device),
            indices.reshape(-1),
            values.reshape(-1).to(v.dtype),
            size=(N, v.shape[1]),
        )
        return (rows @ v.T).T


# -- the sketched tail ----------------------------------------------------------------------------

SKETCH_LEVELS = 7  # 4-bit entries: q in [-7, 7] times a scale per row, stored as q + 7, two per byte
_P = 2**31 - 1  # a Mersenne prime: polynomial hashes mod P stay below 2^62 in int64
_MASK = 2**64 - 1


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _coefficients(seed: int, position: int, stream: int) -> list[int]:
    """A degree-3 polynomial's coefficients mod P (a 4-wise independent hash family), from the
    seed, the module's position and the hash's purpose: plain integer arithmetic, the same on
    every platform and torch version, so that an index and its queries always agree."""
    key = _splitmix((seed << 40) ^ (position << 8) ^ stream)
    out = []
    for _ in range(4):
        key = _splitmix(key)
        out.append(key % _P)
    out[0] = out[0] or 1
    return out


def _hash(x: Tensor, coefficients: list[int]) -> Tensor:
    """((c0 x + c1) x + c2) x + c3 mod P for int64 x >= 0: every product stays below 2^62."""
    x = x % _P
    h = torch.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        h = (h * x + c) % _P
    return h


@dataclass
class ModuleSketch:
    """One module's index layout: the head's flat coordinates and, for the tail, each coordinate's
    bucket and the weights that sketch a gradient (sigma / w) and a query (sigma w), zero on the
    head. The first `private` buckets hold one coordinate each (the tail's largest K-FAC
    eigenvalues, sign +1); the other m - private are a CountSketch of the rest."""

    head: Tensor  # [K] int64 flat coordinates, ascending
    m: int  # buckets (even; 0: no tail)
    private: int  # buckets [0, private) hold one coordinate each
    bucket: Tensor  # [D] int32 (12 bytes per coordinate in all: 10 MB for a 576 x 1536 module)
    gradient_weights: Tensor  # [D] float32
    query_weights: Tensor  # [D] float32
    position: int
    seed: int


def _kfac_eigenvalues(eig_S: Tensor, eig_A: Tensor) -> tuple[Tensor, float]:
    """The K-FAC eigenvalues k = eig_S eig_A, flat [O I], and the whitening's damping 0.1 mean(k)."""
    k = torch.outer(eig_S.double(), eig_A.double()).reshape(-1)
    return k, 0.1 * float(k.mean())


def _tail_order(k: Tensor, head: Tensor) -> Tensor:
    """The tail's coordinates (all but `head`), by decreasing K-FAC eigenvalue (ties: lower index)."""
    keep = torch.ones_like(k, dtype=torch.bool)
    keep[head] = False
    tail = keep.nonzero().flatten()
    return tail[torch.sort(k[tail], descending=True, stable=True).indices]


def _largest(k: Tensor, head: Tensor, p: int) -> Tensor:
    """The tail's p coordinates of largest k (ties: lower index), ascending: _tail_order's first
    p, found in linear time (a module has a million coordinates, a score process 90 modules)."""
    if p == 0:
        return torch.zeros(0, dtype=torch.int64)
    k = k.clone()
    k[head] = -torch.inf
    threshold = torch.kthvalue(-k, p).values.neg()
    above = (k > threshold).nonzero().flatten()
    tied = (k == threshold).nonzero().flatten()[: p - len(above)]
    return torch.sort(torch.cat([above, tied])).values


def module_sketch(
    eig_S: Tensor, eig_A: Tensor, head: Tensor, m: int, private: int, seed: int, position: int
) -> ModuleSketch:
    """The sketch of a module whose head is `head` (flat coordinates) and tail has m buckets, the
    first `private` of them one coordinate's each."""
    k, damping = _kfac_eigenvalues(eig_S, eig_A)
    w = (k + damping).sqrt() if damping > 0 else torch.ones_like(k)
    tail = torch.ones_like(k)
    tail[head] = 0.0
    coords = torch.arange(len(k), dtype=torch.int64)
    rest = m - private
    bucket = private + _hash(coords, _coefficients(seed, position, 0)) % rest if rest else torch.zeros_like(coords)
    sign = (_hash(coords, _coefficients(seed, position, 1)) % 2).double() * 2 - 1
    own = _largest(k, head, private)
    bucket[own], sign[own] = torch.arange(private), 1.0
    return ModuleSketch(
        head, m, private, bucket.int(), (sign * tail / w).float(), (sign * tail * w).float(), position, seed
    )


def _private_buckets(e: Tensor, M: int) -> int:
    """How many of M buckets to give one coordinate each, the tail's coordinates sorted by
    decreasing share e = k / (k + damping) of a whitened gradient's expected square (see the
    module docstring). With p private buckets the estimate's variance is about
    (sum of e past p)^2 / (M - p) from the CountSketch of the rest, plus rounding's, small next
    to it: p minimizes the first, and every coordinate gets its own when they all fit. Even below
    that, so that the rest stays even."""
    if M >= len(e):
        return len(e)
    rest = e.sum() - torch.cat([e.new_zeros(1), e.cumsum(0)])[: M - 1]  # p = 0 .. M - 2
    variance = rest**2 / (M - torch.arange(M - 1, dtype=e.dtype))
    return 2 * (int(variance[::2].argmin()))


def sketch_sizes(
    eigenvalues: dict[str, tuple[Tensor, Tensor]], heads: dict[str, Tensor], budget: int, head_bytes: int
) -> dict[str, tuple[int, int]]:
    """Buckets per module within `budget` bytes per sequence, and how many of them are private:
    the heads (`head_bytes` per coordinate, and a 4-byte scale per module that has one) first,
    the rest shared by the modules' effective dimensions, each at least 2 buckets and at most its
    tail's size (rounded up to even), with two 4-byte scales per sketch.
    ValueError when the budget leaves a sketched module no byte."""
    tails, spread = {}, {}
    for name, (eig_S, eig_A) in eigenvalues.items():
        k, damping = _kfac_eigenvalues(eig_S, eig_A)
        order = _tail_order(k, heads[name])
        tails[name] = k[order] / (k[order] + damping) if damping > 0 else torch.ones_like(k[order])
        spread[name] = float(tails[name].sum())
    sketched = [n for n in tails if len(tails[n])]
    fixed = sum(len(h) * head_bytes + 4 for h in heads.values() if len(h)) + 8 * len(sketched)
    left = budget - fixed
    if sketched and left < len(sketched):
        raise ValueError(
            f"--index-bytes {budget} is too small: the heads and scales take {fixed} bytes per sequence "
            f"and each of the {len(sketched)} modules' sketches needs at least 1 more"
        )
    total = sum(spread[n] for n in sketched) or 1.0
    sizes = {}
    for name, e in tails.items():
        if not len(e):
            sizes[name] = (0, 0)
            continue
        m = min(max(2, 2 * int(left * spread[name] / total)), len(e) + len(e) % 2)
        sizes[name] = (m, _private_buckets(e, m))
    return sizes


def index_rows(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor, sketch: ModuleSketch) -> Tensor:
    """A batch's index row in one module, [B, K + m]: the rotated gradient g_b = Q_S^T DW_b Q_A
    at the head's coordinates, then the tail's sketch S(g_b / w) (unquantized)."""
    rotated = rotated_gradients(a, s, Q_A, Q_S)
    head = rotated[:, sketch.head.to(rotated.device)]
    if not sketch.m:
        return head
    weighted = rotated * sketch.gradient_weights.to(rotated.device, rotated.dtype)
    sums = torch.zeros(rotated.shape[0], sketch.m, dtype=rotated.dtype, device=rotated.device)
    # int64 indices: index_add_ with int32 ones takes a path 13x slower on CPU
    return torch.cat([head, sums.index_add_(1, sketch.bucket.to(rotated.device, torch.int64), weighted)], 1)


def sketch_queries(c: Tensor, sketch: ModuleSketch) -> Tensor:
    """S(c_q w) over the tail, from the queries' coordinates c [Q, D] (every coordinate) -> [Q, m]."""
    weighted = c * sketch.query_weights.to(c.device, c.dtype)
    sums = torch.zeros(c.shape[0], sketch.m, dtype=c.dtype, device=c.device)
    return sums.index_add_(1, sketch.bucket.to(c.device, torch.int64), weighted)


_GOLDEN = (5**0.5 - 1) / 2


def _dither(rows: Tensor, m: int, seed: int, position: int) -> Tensor:
    """Uniform [0, 1) per (row, bucket), float32: a Weyl sequence frac(key_row + frac(j phi)) from
    a hashed key per row, so each entry is uniform over the key, and the same for a row however
    the corpus was split into runs, ranks or appended shards (the key hashes the row's place in
    the index)."""
    key = (_hash(rows.to(torch.int64), _coefficients(seed, position, 2)).double() / _P).float()
    steps = torch.frac(torch.arange(m, dtype=torch.float64, device=rows.device) * _GOLDEN).float()
    return torch.frac(key[:, None] + steps[None, :])


def quantize(x: Tensor, rows: Tensor, seed: int, position: int, private: int) -> tuple[Tensor, Tensor]:
    """Sketch rows x [n, m] (m even) as 4-bit entries, two per byte [n, m / 2] uint8, and two
    scales per row [n, 2] float32, one for the private buckets x[:, :private] (single
    coordinates, heavier-tailed) and one for the rest: q = floor(x / scale + dither), so that
    E[q scale] = x. `rows`: the rows' places in the index [n]."""
    x = x.float()
    parts = (x[:, :private], x[:, private:])
    scale = torch.stack([p.abs().amax(1) if p.shape[1] else p.new_zeros(len(p)) for p in parts], 1) / SKETCH_LEVELS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (
        (x / _per_entry(scale, x.shape[1], private))
        .add_(_dither(rows, x.shape[1], seed, position).to(x.device))
        .floor_()
    )
    nibbles = q.clamp_(-SKETCH_LEVELS, SKETCH_LEVELS).add_(SKETCH_LEVELS).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scale


def dequantize(packed: Tensor, scale: Tensor, private: int) -> Tensor:
    """quantize's rows back, [n, m] float32."""
    nibbles = torch.stack([packed & 15, packed >> 4], 2).flatten(1).float() - SKETCH_LEVELS
    return nibbles * _per_entry(scale.float(), nibbles.shape[1], private)


def _per_entry(scale: Tensor, m: int, private: int) -> Tensor:
    """A row's two scales [n, 2] spread over its m entries [n, m]: the first over the private buckets."""
    return torch.repeat_interleave(scale, torch.tensor([private, m - private]), dim=1)


def sketch_scores(sq: Tensor, rows: Tensor, scale: Tensor, private: int) -> tuple[Tensor, Tensor]:
    """<S(c_q w), S(g_z / w)> and an estimate of its variance: sketched queries sq [Q, m],
    dequantized rows [N, m] and their scales [N, 2] -> ([Q, N], [Q, N]) in sq's dtype. The
    variance is the CountSketch's, |c_q w|^2 |g_z / w|^2 / m' over the hashed buckets (m' of
    them) with |.|^2 read from the sketches themselves (unbiased for it), plus the rounding's,
    sum over buckets of sq^2 scale^2 / 6 (a uniform dither's mean variance)."""
    rows, scale = rows.to(sq.dtype), scale.to(sq.dtype)
    hashed_q, hashed_z = sq[:, private:], rows[:, private:]
    variance = (hashed_q * hashed_q).sum(1)[:, None] * (hashed_z * hashed_z).sum(1)[None, :] / max(hashed_q.shape[1], 1)
    energy = torch.stack([(sq[:, :private] ** 2).sum(1), (hashed_q**2).sum(1)], 1)  # [Q, 2]
    variance += energy @ (scale * scale).T / 6
    return sq @ rows.T, variance
