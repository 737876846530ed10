"""Exact selection engines behind the paper blocks: the k-th largest |x| of a tensor (`topk_mask`,
`kth_largest`), of a tensor streamed in chunks (`TensorTopK`), of a whole model (`ModelTopK`, for TIES
`density_scope: model`), and a tensor's quantile of |x| (`quantile_abs`, `RangeStat`).

All of them are exact, never approximate: a sample brackets the answer, a histogram or a band of
candidates pins it, and ties are kept in index order so that every chunking gives the same bits.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from .._lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

from ._context import DEFAULT_CTX, ModelThreshold, TensorContext, check_choice, check_density, per_expert

# --------------------------------------------------------------------------- top-k by magnitude


def keep_count(density: float, n: int) -> int:
    """k = ceil(density * n), density read as the decimal it is written as.

    The float product rounds (0.07 * 100 == 7.000000000000001, whose ceil is 8); the shortest decimal
    that round-trips the float (repr) is what a recipe says, so k is exact: ceil(7/100 * 100) = 7.
    """
    return math.ceil(Fraction(repr(float(density))) * n)


def _take_first(keep: Tensor, equal: Tensor, quota: Any) -> Tensor:
    """keep | the first (quota - count(keep)) entries of `equal` along the last dim, lowest index first."""
    need = quota - keep.sum(-1, keepdim=True)
    return keep | (equal & (equal.cumsum(-1) <= need))


def _take_first_flat(keep: Tensor, equal: Tensor, need: int) -> Tensor:
    """keep | the first `need` True entries of flat `equal` (in place on keep); no cumsum over n."""
    if need > 0:
        idx = equal.nonzero().reshape(-1)[:need]  # positions in flat order
        keep[idx] = True
    return keep


def topk_mask(x: Tensor, k: int) -> Tensor:
    """Exact top-k by magnitude: exactly min(k, nnz) entries, ties by lowest flat index, zeros never.

    Every |x| above the k-th largest |x|, then entries equal to it in flat (row-major) order.
    """
    a = x.reshape(-1).abs()
    n = a.numel()
    if k >= n:
        return (a != 0).reshape(x.shape)
    if k <= 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    kth = kth_largest(a, k)
    keep = a > kth
    if float(kth) == 0:  # zeros are never kept: fewer than k non-zero entries
        return keep.reshape(x.shape)
    equal = a == kth
    need = k - int(keep.sum())
    if int(equal.sum()) > need:  # more ties than room: lowest indices first
        return _take_first_flat(keep, equal, need).reshape(x.shape)
    return keep.logical_or_(equal).reshape(x.shape)


_SAMPLE = 1 << 16  # entries sampled to bracket the k-th largest


def kth_largest(a: Tensor, k: int) -> Tensor:
    """The k-th largest value of flat `a` (1 <= k <= n), exactly, by selection.

    Large inputs: a strided sample brackets the answer between two values lo <= kth <= hi (a margin
    of several binomial standard deviations around the sample's k-th largest); counting the entries
    above hi and gathering the few in [lo, hi] leaves a small kthvalue. Where the bracket misses (an
    unlucky sample, or many ties) it falls back to kthvalue on the whole input. Either way the value is
    exact; only the time differs (a few cheap passes instead of a selection over n entries).
    """
    n = a.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(a, n - k + 1).values
    step = n // _SAMPLE
    sample = a[::step]  # (s,) strided view: deterministic, no copy of a
    s = sample.numel()
    p = k / n
    margin = 6.0 * math.sqrt(max(p * (1 - p), 1.0 / s) * s) + 2
    hi_rank = max(1, math.floor(p * s - margin))  # ranks from the top in the sample
    lo_rank = min(s, math.ceil(p * s + margin))
    hi = torch.kthvalue(sample, s - hi_rank + 1).values
    lo = torch.kthvalue(sample, s - lo_rank + 1).values
    above = int((a > hi).sum())  # entries certainly in the top k
    if above < k:
        band = a[(a >= lo) & (a <= hi)]  # (b,) with b << n
        if above + band.numel() >= k:  # the k-th largest lies in [lo, hi]
            need = k - above  # its rank from the top of the band
            return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(a, n - k + 1).values


# --------------------------------------------------------------------------- Scaling-Masks range


def quantile_abs(x: Tensor, q: float) -> float:
    """The q-quantile of |x| with numpy's default (linear) interpolation, by selection.

    torch.quantile refuses inputs above 16M elements; two kthvalue calls do not.
    """
    a = x.reshape(-1).abs()
    n = a.numel()
    if n == 0:
        return 0.0
    h = (n - 1) * q
    lo = math.floor(h)
    v_lo = float(torch.kthvalue(a, lo + 1).values)
    if h == lo:
        return v_lo
    v_hi = float(torch.kthvalue(a, lo + 2).values)
    return v_lo + (h - lo) * (v_hi - v_lo)


def range_stat(x: Tensor, stat: str, q: float) -> float:
    """r = max |x| (absmax) or the q-quantile of |x| (quantile)."""
    check_choice(stat, ("absmax", "quantile"), "stat")
    if x.numel() == 0:
        return 0.0
    return float(x.abs().max()) if stat == "absmax" else quantile_abs(x, q)


# --------------------------------------------------------------------------- model-wide threshold

_HI_BINS = 1 << 15  # |x| has sign bit 0: the high 16 bits of its pattern are < 2**15
_LO_BINS = 1 << 16


def _abs_bits(x: Tensor) -> Tensor:
    """Bit patterns of |x| (float32) as int32: for non-negative floats their order is the values' order."""
    return x.detach().reshape(-1).to(torch.float32).abs().contiguous().view(torch.int32)


def _kth_bin(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest (1-based) of a histogram, and the count in higher bins."""
    from_top = hist.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    b = hist.numel() - 1 - i
    return b, int(from_top[i]) - int(hist[b])


class _RadixSelect:
    """Exact k-th largest |x| of each row over every part fed to it, in two passes (radix select).

    Non-negative float32 values order like their bit patterns read as int32, so the k-th largest is
    found 16 bits at a time: pass 1 counts the high halves, pass 2 the low halves of the entries whose
    high half is the chosen one. Memory: a few histograms per row, whatever the data size.
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.count = [0] * rows
        self.zeros = [0] * rows
        self._hist: list[Tensor | None] = [None] * rows
        self._picks: list[list[tuple[int, int, int]]] = [[] for _ in range(rows)]  # (k, bin, above)
        self._low: list[dict[int, Tensor]] = [{} for _ in range(rows)]  # bin -> low-half counts

    def feed(self, rows: Sequence[Tensor] | Tensor, first_pass: bool) -> None:
        for r, x in enumerate(rows):
            if not first_pass and not self._picks[r]:
                continue
            bits = _abs_bits(x)
            if first_pass:
                self.count[r] += bits.numel()
                self.zeros[r] += bits.numel() - int(torch.count_nonzero(bits))
                counts = torch.bincount(bits >> 16, minlength=_HI_BINS).cpu()
                self._hist[r] = counts if self._hist[r] is None else self._hist[r].add_(counts)
                continue
            for b in {b for _, b, _ in self._picks[r]}:
                counts = _low_half_counts(bits, b)
                low = self._low[r]
                low[b] = counts if b not in low else low[b].add_(counts)

    def pick(self, ranks: Sequence[Sequence[int]]) -> None:
        """After pass 1: the ranks (1 <= k <= count, from the top) to find in each row."""
        for r, ks in enumerate(ranks):
            hist = self._hist[r] if self._hist[r] is not None else torch.zeros(_HI_BINS, dtype=torch.int64)
            self._picks[r] = [(k, *_kth_bin(hist, k)) for k in ks]
        self._hist = [None] * self.rows

    def found(self) -> list[list[tuple[float, int, int]]]:
        """After pass 2: per row and rank, (k-th largest, entries above it, entries equal to it)."""
        out = []
        for r in range(self.rows):
            row = []
            for k, b, above in self._picks[r]:
                low, above_low = _kth_bin(self._low[r][b], k - above)
                value = struct.unpack("<f", struct.pack("<I", (b << 16) | low))[0]
                row.append((value, above + above_low, int(self._low[r][b][low])))
            out.append(row)
        return out


def _low_half_counts(bits: Tensor, high: int) -> Tensor:
    """Counts of the low 16 bits of the entries of `bits` whose high 16 bits are `high`."""
    if bits.device.type == "cpu":  # numpy's compare and boolean index are vectorized, torch's bool ops not
        b = bits.numpy()
        return torch.from_numpy(np.bincount(b[(b >> 16) == high] & 0xFFFF, minlength=_LO_BINS))
    return torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=_LO_BINS).cpu()


class ModelTopK:
    """Exact k-th largest |tau_t| per expert over a whole tensor or model, in two streaming passes.

    k_t = ceil(density_t * N), N the entries fed per expert; found by radix select (`_RadixSelect`).
    The thresholds keep |tau_t| > value and then `equal_left` entries equal to it, in the order they are
    trimmed (`trim_by`). Used per tensor by `trim_each` (as a TensorContext.whole_tensor statistic) and
    over every mergeable tensor for TIES `density_scope: model`.

    Driving it (the engine)::

        finder = ModelTopK(n_experts, density)
        while not finder.done:
            for name in mergeable_names:             # any order; any chunking of a tensor is fine
                finder.update([tau_1, ..., tau_T])    # this tensor's task vectors, any device
            finder.end_pass()
        ctx_thresholds = finder.thresholds()         # list[ModelThreshold], one per expert

    Each pass must see every entry exactly once, with the same tau values the merge will trim
    (float32 theta_t - theta0, as `task_vectors` computes them).
    """

    PASSES = 2

    def __init__(self, n_experts: int, density: float | Sequence[float]) -> None:
        self.densities = per_expert(density, n_experts, "density")
        for d in self.densities:
            check_density(d)
        self.n_experts = n_experts
        self._pass = 0
        self._select = _RadixSelect(n_experts)
        self._k = [0] * n_experts
        self._result: list[ModelThreshold] | None = None

    @property
    def done(self) -> bool:
        return self._pass >= self.PASSES

    def update(self, taus: Sequence[Tensor] | Tensor) -> None:
        """Count one tensor (or chunk) of every expert's task vector for the current pass."""
        if len(taus) != self.n_experts:
            raise ValueError(f"{len(taus)} task vectors for {self.n_experts} experts")
        if self.done:
            raise ValueError("ModelTopK: both passes are done; call thresholds()")
        self._select.feed(taus, first_pass=self._pass == 0)

    def end_pass(self) -> None:
        """Close the current pass: pick the high bin (pass 1) or the exact threshold (pass 2)."""
        sel = self._select
        if self._pass == 0:
            ranks = []
            for t in range(self.n_experts):
                self._k[t] = keep_count(self.densities[t], sel.count[t])
                keep_all = self._k[t] >= sel.count[t] - sel.zeros[t]  # every non-zero entry
                ranks.append([] if keep_all else [self._k[t]])
            sel.pick(ranks)
        else:
            self._result = [
                ModelThreshold(found[0][0], self._k[t] - found[0][1]) if found else ModelThreshold(0.0, 0)
                for t, found in enumerate(sel.found())
            ]
        self._pass += 1

    def thresholds(self) -> list[ModelThreshold]:
        if self._result is None:
            raise ValueError(f"ModelTopK: {self.PASSES} passes needed, {self._pass} done")
        return self._result

    def result(self) -> list[ModelThreshold]:
        """Fresh copies of the thresholds (trimming consumes their tie budgets)."""
        return [t.copy() for t in self.thresholds()]


_INT32_MAX = 2**31 - 1
_SAMPLE_CHUNKS = 4  # chunks a sample pass reads; a tensor of no more is selected from its first pass
_SAMPLE_STEP = 4  # every 4th entry of a sampled chunk: 256K entries per row
_BAND_CAP = 1 << 22  # entries per row a band may hold before the selection falls back to radix


_NP_SAMPLE = 1 << 14


def _kth_largest_np(a: Any, k: int) -> tuple[int, int]:
    """The k-th largest of a numpy int array (1 <= k <= a.size) and how many entries exceed it, exactly:
    np.partition on the entries of a sampled bracket where that holds the answer (as kth_largest
    does), on the whole array otherwise."""
    n = a.size
    above = 0
    if n > 4 * _NP_SAMPLE:
        sample = np.sort(a[:: n // _NP_SAMPLE])
        s = sample.size
        p = k / n
        margin = 6.0 * math.sqrt(max(p * (1 - p), 1.0 / s) * s) + 2
        hi = sample[s - max(1, math.floor(p * s - margin))]
        lo = sample[s - min(s, math.ceil(p * s + margin))]
        above = int(np.count_nonzero(a > hi))
        band = a[(a >= lo) & (a <= hi)] if above < k else a[:0]
        if above < k <= above + band.size:
            a, k, n = band, k - above, band.size
        else:
            above = 0
    kth = int(np.partition(a, n - k)[n - k])
    return kth, above + int(np.count_nonzero(a > kth))


class TensorTopK:
    """Exact top-k thresholds of each row of one tensor, k_t = ceil(density_t * n): the ModelThresholds
    that ModelTopK would give, found with less work where the tensor is streamed in chunks.

    A tensor of at most 4 chunks: one pass keeps each row's |x| bit patterns and selects the k-th
    largest among them (np.partition on a sampled bracket). A larger one: a sample pass reads every 4th entry of 4 chunks
    spread over the tensor and brackets the k-th largest, [lo, hi], by 6 binomial standard deviations
    of the sample's rank; one counting pass then counts the entries above hi and keeps those in [lo, hi]
    (the band, about 1% of the tensor), whose (k - above)-th largest is the answer. A row whose bracket
    missed, or whose band outgrew 4M entries (massive ties), falls back to radix selection (ModelTopK):
    two more passes. Bit patterns of non-negative float32 order like the values.
    """

    def __init__(self, rows: int, densities: Sequence[float]) -> None:
        self.rows = rows
        self.densities = per_expert(list(densities), rows, "density")
        self.done = False
        self._phase = "first"  # -> "sample" -> "band" [-> radix] ; "first" decides
        self._chunks: int | None = None
        self._sample: list[list[Tensor]] = [[] for _ in range(rows)]
        self._bracket = [(1, _INT32_MAX)] * rows  # [lo, hi] as bit patterns; lo >= 1: zeros never in a band
        self._n = [0] * rows  # counted in the band pass: entries, zeros, entries above hi
        self._zeros = [0] * rows
        self._above = [0] * rows
        self._band: list[list[Any] | None] = [[] for _ in range(rows)]  # None: outgrew _BAND_CAP
        self._band_size = [0] * rows
        self._radix: ModelTopK | None = None
        self._result: list[ModelThreshold] | None = None
        self._own_bracket = False  # a tensor of few chunks: bracket each row on a sample of its first chunk

    def wants(self, index: int, count: int) -> bool:
        """Whether the current pass reads chunk `index` of `count` (the sample pass reads a few)."""
        if self._chunks is None:
            self._chunks = count
            if self._phase == "first":
                self._phase = "band" if count <= _SAMPLE_CHUNKS else "sample"
                self._own_bracket = self._phase == "band"
        if self._phase != "sample":
            return True
        stride = -(-count // _SAMPLE_CHUNKS)
        return index % stride == 0

    def update(self, x: Sequence[Tensor] | Tensor) -> None:
        if self._phase == "first":  # fed without wants(): a whole tensor in hand
            self._phase = "band"
            self._own_bracket = True
        if self._radix is not None:
            self._radix.update(x)
            return
        for r, row in enumerate(x):
            bits = _abs_bits(row)
            if self._phase == "sample":
                self._sample[r].append(bits[::_SAMPLE_STEP].clone())
            else:
                self._count_band(r, bits)

    def _count_band(self, r: int, bits: Tensor) -> None:
        lo, hi = self._bracket[r]
        b = bits.cpu().numpy()  # numpy: its compares and boolean indexing are vectorized
        if self._own_bracket and self._n[r] == 0 and b.size >= 4 * _NP_SAMPLE:
            # one pass only, so no sample pass: bracket on a strided sample of this first part (a bracket
            # that misses the k-th largest of the whole tensor costs the radix fallback, never exactness)
            step = max(1, b.size // (4 * _NP_SAMPLE))
            self._bracket[r] = self._bracket_of(torch.from_numpy(b[::step].copy()), self.densities[r])
            lo, hi = self._bracket[r]
        self._n[r] += b.size
        self._zeros[r] += b.size - int(np.count_nonzero(b))
        band = self._band[r]
        if (lo, hi) == (1, _INT32_MAX):  # no bracket: keep everything (zeros rank last, below any k-th)
            kept = b
        else:
            self._above[r] += int(np.count_nonzero(b > hi))
            if band is None:
                return
            kept = b[(b >= lo) & (b <= hi)]  # boolean indexing: np.extract goes through nonzero()
        self._band_size[r] += kept.size
        if band is None or self._band_size[r] > _BAND_CAP:
            self._band[r] = None  # massive ties: radix selection instead
        else:
            band.append(kept)

    def end_pass(self) -> None:
        if self._radix is not None:
            self._radix.end_pass()
            if self._radix.done:
                self._result = self._radix.thresholds()
                self.done = True
        elif self._phase == "sample":
            self._bracket = [
                self._bracket_of(torch.cat(rows), d)
                for rows, d in zip(self._sample, self.densities, strict=True)
            ]
            self._sample = []
            self._phase = "band"
        else:
            found = [self._select(r) for r in range(self.rows)]
            if all(f is not None for f in found):
                self._result = found  # type: ignore[assignment]
                self.done = True
            else:
                self._radix = ModelTopK(self.rows, self.densities)
            self._band = []

    @staticmethod
    def _bracket_of(sample: Tensor, density: float) -> tuple[int, int]:
        """Bit patterns [lo, hi] that hold the k-th largest with high probability (as kth_largest)."""
        s = sample.numel()
        if s == 0:
            return 1, _INT32_MAX
        p = density
        margin = 6.0 * math.sqrt(max(p * (1 - p), 1.0 / s) * s) + 2
        hi_rank = math.floor(p * s - margin)  # ranks from the top of the sample
        lo_rank = math.ceil(p * s + margin)
        ranks = [s - r for r in (hi_rank, lo_rank) if 1 <= r <= s]  # 0-based positions in ascending order
        part = np.partition(sample.numpy(), ranks) if ranks else None
        hi = int(part[s - hi_rank]) if hi_rank >= 1 else _INT32_MAX  # type: ignore[index]
        lo = int(part[s - lo_rank]) if lo_rank <= s else 1  # type: ignore[index]
        return max(lo, 1), hi

    def _select(self, r: int) -> ModelThreshold | None:
        n, zeros, above = self._n[r], self._zeros[r], self._above[r]
        k = keep_count(self.densities[r], n)
        if k >= n - zeros:  # every non-zero entry
            return ModelThreshold(0.0, 0)
        band = self._band[r]
        if band is None or not above < k <= above + self._band_size[r]:
            return None  # the k-th largest is outside the bracket
        values = np.concatenate(band) if len(band) > 1 else band[0]
        kth, greater = _kth_largest_np(values, k - above)  # its rank from the top of the band
        value = struct.unpack("<f", struct.pack("<i", kth))[0]
        left = k - above - greater
        return ModelThreshold(value, left, equal_all=left == int(np.count_nonzero(values == kth)))

    def result(self) -> list[ModelThreshold]:
        if self._result is None:
            raise ValueError("TensorTopK: read before every pass was fed")
        return [t.copy() for t in self._result]


class RangeStat:
    """Scaling-Masks' r_t of every row over the whole tensor: max |x| (one pass) or the q-quantile of
    |x| with numpy's linear interpolation (two passes, the two order statistics by radix select)."""

    def __init__(self, rows: int, stat: str, q: float) -> None:
        check_choice(stat, ("absmax", "quantile"), "stat")
        self.rows, self.stat, self.q = rows, stat, q
        self._passes = 1 if stat == "absmax" else 2
        self._pass = 0
        self._max = [0.0] * rows
        self._select = _RadixSelect(rows)
        self._result: list[float] | None = None

    @property
    def done(self) -> bool:
        return self._pass >= self._passes

    def update(self, x: Sequence[Tensor] | Tensor) -> None:
        if self.stat == "quantile":
            self._select.feed(x, first_pass=self._pass == 0)
            return
        for r, row in enumerate(x):
            if row.numel():
                self._max[r] = max(self._max[r], float(row.abs().max()))

    def end_pass(self) -> None:
        self._pass += 1
        if self.stat == "absmax":
            self._result = list(self._max)
        elif self._pass == 1:
            self._select.pick([self._ranks(n) for n in self._select.count])
        else:
            self._result = [
                self._quantile(n, found)
                for n, found in zip(self._select.count, self._select.found(), strict=True)
            ]

    def _ranks(self, n: int) -> list[int]:
        """The (lo + 1)-th and (lo + 2)-th smallest, as ranks from the top, h = (n - 1) q, lo = floor(h)."""
        if n == 0:
            return []
        h = (n - 1) * self.q
        lo = math.floor(h)
        return [n - lo] if h == lo else [n - lo, n - lo - 1]

    def _quantile(self, n: int, found: list[tuple[float, int, int]]) -> float:
        if n == 0:
            return 0.0
        h = (n - 1) * self.q
        lo = math.floor(h)
        v_lo = found[0][0]
        return v_lo if h == lo else v_lo + (h - lo) * (found[1][0] - v_lo)

    def result(self) -> list[float]:
        if self._result is None:
            raise ValueError("RangeStat: read before every pass was fed")
        return list(self._result)


def range_stats(taus: Tensor, stat: str, q: float, ctx: TensorContext = DEFAULT_CTX) -> list[float]:
    """r_t of every row of (T, n) over the whole tensor (see range_stat); `taus` may be one chunk."""
    return ctx.whole_tensor(RangeStat(taus.shape[0], stat, q), taus)


def model_thresholds(
    passes: Callable[[], Iterable[Sequence[Tensor]]], n_experts: int, density: float | Sequence[float]
) -> list[ModelThreshold]:
    """Exact model-wide top-k thresholds, one per expert, for TIES `density_scope: model`.

    `passes()` is called twice (ModelTopK.PASSES); each call yields, for every mergeable tensor, the
    list of its task vectors tau_1..tau_T. Put the result in TensorContext.model_thresholds and merge
    the tensors in engine order, each once: the threshold objects count down the ties they keep.
    """
    finder = ModelTopK(n_experts, density)
    while not finder.done:
        for taus in passes():
            finder.update(taus)
        finder.end_pass()
    return finder.thresholds()


def tensor_thresholds(
    thresholds: Sequence[ModelThreshold],
    names: Sequence[str],
    tensors: Callable[[], Iterable[tuple[str, Sequence[Tensor]]]],
) -> dict[str, list[ModelThreshold]]:
    """Each tensor's own copy of the model-wide thresholds, with its share of the tie budgets.

    The model-wide rule keeps, of the entries equal to expert t's threshold, the first `equal_left` in
    (tensor name, flat index) order. Handing each tensor its share up front makes the result
    independent of the order in which worker threads merge the tensors. When some expert has ties to
    share, `tensors()` is called once: it yields (name, that tensor's task vectors) for every tensor,
    any chunking, any order; equal entries are counted per tensor and the budgets split in name order.
    """
    names = sorted(names)  # the rule's order: by name, so files, shards and dict order do not matter
    share = [t.equal_left if t.value != 0 else 0 for t in thresholds]
    counts: dict[str, list[int]] = {n: [0] * len(thresholds) for n in names}
    if any(share):
        for name, taus in tensors():
            c = counts[name]
            for t, (tau, thr) in enumerate(zip(taus, thresholds, strict=True)):
                if share[t]:
                    c[t] += int(torch.eq(tau.abs(), thr.value).sum())
    out: dict[str, list[ModelThreshold]] = {}
    for name in names:
        row = []
        for t, thr in enumerate(thresholds):
            take = min(counts[name][t], share[t])
            share[t] -= take
            row.append(ModelThreshold(thr.value, take))
        out[name] = row
    return out
