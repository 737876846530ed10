"""`pleas`: PLeaS, merging two models by permutations of hidden units and layer-wise least squares.

Nasery, Hayase, Koh, Oh, "PLeaS: Merging Models with Permutations and Least Squares" (CVPR 2025),
https://arxiv.org/abs/2407.02447. Two models of one architecture, any bases.

1. **Permutations.** For each layer's hidden units, the correlation of A's and B's features on the same
   inputs (Pearson, over every row: example or token), C[i, j] = corr(z^A_i, z^B_j), is matched by a
   linear assignment (scipy.optimize.linear_sum_assignment, maximizing sum_i C[i, perm[i]]): B's unit
   perm[i] goes with A's unit i.
2. **Partial merging.** With `budget` b in (0, 1], the k = ceil(b d) best-matched pairs (highest
   correlation; ties by A's index) are merged into one unit each; the d - k least-matched units of *both*
   models are kept side by side, so the merged layer has k + 2 (d - k) units (b = 1: the models' width).
   Combined features: z~ = [ (z^A_M + z^B_perm(M)) / 2 , z^A_U , z^B_perm(U) ].
3. **Least squares.** Every merged linear layer is fit to the combined features of the original models:
   W~, b~ = argmin || z~_in W~^T + b~ - y~_out ||^2, y~_out the combined pre-activation outputs, in closed
   form per output group; an output kept from A only may read the merged and A-only inputs, one kept from
   B only the merged and B-only inputs, a merged output every input (the paper's gradient mask, solved
   exactly). Normal equations in float64 with column scaling and a relative eigenvalue cutoff (RCOND^2):
   directions the data does not determine get no weight (the minimum-norm solution), e.g. the direction
   that every LayerNorm output is orthogonal to.

Two entry points (whole-model procedures, not per tensor):

* :func:`merge_mlp`: a stack of linear layers [(W, b)] with activations between them.
* :func:`merge_encoders`: BERT-style encoders (HF names: ``embeddings.*``, ``encoder.layer.N.attention.
  self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``, ``output.dense``, their
  LayerNorms, optional ``pooler.dense``; any prefix) given as state dicts plus a function returning each
  model's activations. Structure respected: one permutation of the **residual stream** shared by every
  tensor that reads or writes it (embeddings, LayerNorms, attention output and FFN output rows, query /
  key / value / intermediate columns), matched on all residual states together; **attention heads**
  permuted as blocks (head assignment on the summed within-head matching scores), query and key dims by
  one shared permutation within a head (q.k is invariant to it), value dims and the attention output's
  columns by another. Residual stream and heads are always fully merged (a wider residual stream would
  change what LayerNorm computes, and extra heads would not load as a BERT model); `budget` < 1 widens
  the FFN (intermediate_size becomes k + 2 (I - k)). Embeddings, LayerNorms and the pooler (whose inputs
  are one row per example, too few for a fit) are permuted and averaged; every linear layer of the
  encoder layers is fit by least squares.

The registered method `pleas` declares the parameters (budget, examples) and `merge_encoders` as its
whole-model procedure; the registry refuses a per-tensor call with an explanation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from annotated_types import Gt, Le

from .._lazy import torch
from ..errors import RecipeError
from ..registry import StudyGrid, register
from ._data import StatisticsError
from ._ops import PosInt, keep_count

if TYPE_CHECKING:
    from torch import Tensor

Budget = Annotated[float, Gt(0), Le(1)]
RCOND = 1e-6  # singular values of the (column-scaled) design below RCOND * the largest count as zero
OUTPUT = "last_hidden_state"  # the activation key of the encoder's final residual state


# --------------------------------------------------------------------------- checks


def check_pair(count: int) -> None:
    if count != 2:
        raise RecipeError(f"pleas merges exactly two models, got {count}")


def check_budget(budget: float) -> None:
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise RecipeError(f"pleas: budget must be in (0, 1], got {budget!r}")


# --------------------------------------------------------------------------- matching


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of every column of a (N, d) with every column of b (N, e): (d, e), float64.

    A constant column correlates 0 with everything.
    """
    if a.shape[0] != b.shape[0]:
        raise StatisticsError(f"pleas: {a.shape[0]} activation rows of model A but {b.shape[0]} of model B")

    def unit(x: Tensor) -> Tensor:
        x = x.double()
        x = x - x.mean(0, keepdim=True)
        norm = x.norm(dim=0, keepdim=True)
        return x / torch.where(norm > 0, norm, torch.ones_like(norm))

    return unit(a).T @ unit(b)


def assign(score: Tensor) -> tuple[Tensor, Tensor]:
    """Linear assignment maximizing sum_i score[i, perm[i]]: returns perm (d,) long and the scores (d,)."""
    from scipy.optimize import linear_sum_assignment

    s = score.detach().double().cpu()
    if not bool(torch.isfinite(s).all()):
        raise StatisticsError("pleas: the matching scores are not finite (non-finite activations?)")
    rows, cols = linear_sum_assignment(s.numpy(), maximize=True)
    perm = torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]  # (d,)
    return perm, s[torch.arange(s.shape[0]), perm]


@dataclass(frozen=True)
class Matching:
    """How A's and B's units of one layer map into the merged layer [merged pairs | A only | B only].

    perm (d,): B's unit perm[i] is matched to A's unit i; score (d,): those pairs' correlation.
    merged_a, merged_b (k,): the merged pairs (A's index ascending); only_a, only_b (d - k,): the units
    kept from each model. width = k + 2 (d - k).
    """

    perm: Tensor
    score: Tensor
    merged_a: Tensor
    merged_b: Tensor
    only_a: Tensor
    only_b: Tensor

    @classmethod
    def partial(cls, perm: Tensor, score: Tensor, budget: float) -> Matching:
        """Merge the k = ceil(budget * d) best-matched pairs (ties: lower A index first), keep the rest."""
        d = perm.shape[0]
        k = min(d, keep_count(budget, d))
        order = torch.sort(-score, stable=True).indices  # best first
        merged_a = order[:k].sort().values
        only_a = order[k:].sort().values
        return cls(perm, score, merged_a, perm[merged_a], only_a, perm[only_a])

    @classmethod
    def identity(cls, d: int) -> Matching:
        """Inputs or outputs that are not hidden units (data, logits): unit i with unit i, all merged."""
        idx = torch.arange(d)
        empty = idx[:0]
        return cls(idx, torch.ones(d, dtype=torch.float64), idx, idx, empty, empty)

    @property
    def k(self) -> int:
        return int(self.merged_a.shape[0])

    @property
    def width(self) -> int:
        return self.k + 2 * int(self.only_a.shape[0])

    def groups(self) -> tuple[slice, slice, slice]:
        """Column ranges of the merged layer: merged, A only, B only."""
        u = int(self.only_a.shape[0])
        return slice(0, self.k), slice(self.k, self.k + u), slice(self.k + u, self.k + 2 * u)

    def combine(self, za: Tensor, zb: Tensor) -> Tensor:
        """Combined features (N, width) from A's (N, d) and B's (N, d): averaged pairs, then both leftovers."""
        dev = za.device
        ma, mb = self.merged_a.to(dev), self.merged_b.to(dev)
        return torch.cat(
            [(za[:, ma] + zb[:, mb]) / 2, za[:, self.only_a.to(dev)], zb[:, self.only_b.to(dev)]], dim=1
        )


def match(za: Tensor, zb: Tensor, budget: float) -> Matching:
    """Match A's units (columns of za (N, d)) with B's (zb (N, d)) on correlation; keep a `budget` share."""
    perm, score = assign(correlation(za, zb))
    return Matching.partial(perm, score, budget)


# --------------------------------------------------------------------------- least squares


def _lstsq(x: Tensor, y: Tensor) -> Tensor:
    """argmin_beta || [x 1] beta - y ||^2 for x (N, m), y (N, o): beta (m + 1, o), float64.

    Normal equations on column-scaled [x 1]; eigenvalues below RCOND^2 times the largest are dropped
    (the minimum-norm solution in the scaled coordinates where the data leave directions undetermined).
    """
    design = torch.cat([x, torch.ones((x.shape[0], 1), dtype=x.dtype, device=x.device)], dim=1)  # (N, m+1)
    gram = design.T @ design  # (m+1, m+1)
    rhs = design.T @ y  # (m+1, o)
    scale = gram.diagonal().sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    evals, evecs = torch.linalg.eigh(gram / scale[:, None] / scale[None, :])
    keep = evals > (RCOND**2) * evals.max()
    v = evecs[:, keep]  # (m+1, r)
    beta_scaled = v @ ((v.T @ (rhs / scale[:, None])) / evals[keep][:, None])
    return beta_scaled / scale[:, None]


def fit_layer(x: Tensor, y: Tensor, inputs: Matching, outputs: Matching, what: str) -> tuple[Tensor, Tensor]:
    """Least-squares weights W (width_out, width_in) and bias (width_out,) from combined features.

    x (N, inputs.width), y (N, outputs.width). Outputs kept from A only read the merged and A-only inputs,
    outputs from B only the merged and B-only inputs (the others' weights are 0); merged outputs read all.
    """
    n = x.shape[0]
    if n < x.shape[1] + 1:
        raise StatisticsError(
            f"pleas: too few examples for layer '{what}': {n} activation rows for {x.shape[1]} inputs + a "
            f"bias; the least-squares fit needs at least {x.shape[1] + 1} (raise `examples`)"
        )
    x, y = x.double(), y.double()
    w_in, w_out = inputs.width, outputs.width
    weight = torch.zeros((w_out, w_in), dtype=torch.float64, device=x.device)
    bias = torch.zeros(w_out, dtype=torch.float64, device=x.device)
    in_m, in_a, in_b = inputs.groups()
    out_m, out_a, out_b = outputs.groups()
    cols_all = torch.arange(w_in, device=x.device)
    allowed = {
        "merged": (out_m, cols_all),
        "a": (out_a, torch.cat([cols_all[in_m], cols_all[in_a]])),
        "b": (out_b, torch.cat([cols_all[in_m], cols_all[in_b]])),
    }
    for rows, cols in allowed.values():
        if rows.stop - rows.start == 0:
            continue
        beta = _lstsq(x[:, cols], y[:, rows])  # (len(cols) + 1, rows)
        weight[rows.start : rows.stop, cols] = beta[:-1].T
        bias[rows] = beta[-1]
    return weight, bias


# --------------------------------------------------------------------------- MLPs


Layer = tuple["Tensor", "Tensor"]


@dataclass
class MlpMerge:
    """layers: the merged [(W (out, in), b (out,))] in float32; matchings: one per hidden layer."""

    layers: list[tuple[Tensor, Tensor]]
    matchings: list[Matching]

    @property
    def widths(self) -> list[int]:
        return [m.width for m in self.matchings]


def _activations(activation: Callable | Sequence[Callable], count: int) -> list[Callable]:
    if callable(activation):
        return [activation] * count
    acts = list(activation)
    if len(acts) != count:
        raise RecipeError(f"pleas: {len(acts)} activations for {count} hidden layers")
    return acts


def mlp_forward(
    layers: Sequence[Layer], x: Tensor, activation: Callable | Sequence[Callable] = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Pre-activations y_i and inputs z_{i-1} of every layer: z_0 = x, y_i = z_{i-1} W_i^T + b_i,
    z_i = act_i(y_i). Returns ([z_0 .. z_{L-1}], [y_1 .. y_L])."""
    acts = _activations(activation if activation is not None else torch.relu, len(layers) - 1)
    ins, pre = [], []
    z = x
    for i, (w, b) in enumerate(layers):
        ins.append(z)
        y = z @ w.T + b
        pre.append(y)
        if i < len(layers) - 1:
            z = acts[i](y)
    return ins, pre


def merge_mlp(
    models: Sequence[Sequence[Layer]],
    inputs: Tensor,
    *,
    activation: Callable | Sequence[Callable] | None = None,
    budget: float = 1.0,
) -> MlpMerge:
    """PLeaS for two MLPs [(W_i (d_i, d_{i-1}), b_i (d_i,))] with activation(s) between layers (default ReLU).

    inputs (N, d_0): the data both models are run on (N >= widest merged fan-in + 1). Hidden units are
    matched on post-activation features; the first layer's inputs and the last layer's outputs are not
    permuted (the merged model's outputs fit the average of both models' outputs).
    """
    check_pair(len(models))
    check_budget(budget)
    a, b = [list(m) for m in models]
    if len(a) != len(b) or not a:
        raise RecipeError(
            f"pleas: the models have {len(a)} and {len(b)} layers; they must match (and be > 0)"
        )
    for i, ((wa, ba), (wb, bb)) in enumerate(zip(a, b, strict=True)):
        for what, ta, tb in (("weight", wa, wb), ("bias", ba, bb)):
            if tuple(ta.shape) != tuple(tb.shape):
                raise RecipeError(
                    f"pleas: layer {i} {what} has shape {tuple(ta.shape)} in model A but {tuple(tb.shape)} in B"
                )
        if wa.dim() != 2 or tuple(ba.shape) != (wa.shape[0],):
            raise RecipeError(
                f"pleas: layer {i} must be W (out, in) and b (out,), got {tuple(wa.shape)}, {tuple(ba.shape)}"
            )
        if i and wa.shape[1] != a[i - 1][0].shape[0]:
            raise RecipeError(
                f"pleas: layer {i} takes {wa.shape[1]} inputs but layer {i - 1} has {a[i - 1][0].shape[0]} outputs"
            )
    x = inputs.double()
    if x.dim() != 2 or x.shape[1] != a[0][0].shape[1]:
        raise RecipeError(f"pleas: inputs must be (N, {a[0][0].shape[1]}), got {tuple(inputs.shape)}")
    dbl = [[(w.double(), bb.double()) for w, bb in m] for m in (a, b)]
    ins_a, pre_a = mlp_forward(dbl[0], x, activation)
    ins_b, pre_b = mlp_forward(dbl[1], x, activation)
    n_layers = len(a)
    matchings = [Matching.identity(x.shape[1])]
    matchings += [match(ins_a[i], ins_b[i], budget) for i in range(1, n_layers)]
    matchings.append(Matching.identity(a[-1][0].shape[0]))
    layers = []
    for i in range(n_layers):
        xin = matchings[i].combine(ins_a[i], ins_b[i])  # (N, width_in)
        yout = matchings[i + 1].combine(pre_a[i], pre_b[i])  # (N, width_out)
        w, bias = fit_layer(xin, yout, matchings[i], matchings[i + 1], f"layer {i}")
        layers.append((w.float(), bias.float()))
    return MlpMerge(layers=layers, matchings=matchings[1:-1])


# --------------------------------------------------------------------------- BERT-style encoders

Q, K, V = "attention.self.query", "attention.self.key", "attention.self.value"
AO, ALN = "attention.output.dense", "attention.output.LayerNorm"
FI, FO, OLN = "intermediate.dense", "output.dense", "output.LayerNorm"
EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")
_LAYER_RE = re.compile(r"^(?P<prefix>.*?)encoder\.layer\.(?P<i>\d+)\.attention\.self\.query\.weight$")


@dataclass
class EncoderMerge:
    """The merged encoder state dict (float32, the input names; intermediate widened when budget < 1),
    the residual-stream matching, per layer the query/key and value/output matchings and the FFN's."""

    state_dict: dict[str, Tensor]
    residual: Matching
    qk: list[Matching]
    vo: list[Matching]
    ffn: list[Matching]
    intermediate_size: int
    notes: list[str] = field(default_factory=list)

    def head_input(self, weight: Tensor, model: int) -> Tensor:
        """A task head's weight (C, H) reading the residual stream of model 0 (A) or 1 (B), in merged order."""
        check_model_index(model)
        return weight if model == 0 else weight[:, self.residual.perm.to(weight.device)]


def check_model_index(model: int) -> None:
    if model not in (0, 1):
        raise RecipeError(f"pleas: model index must be 0 (A) or 1 (B), got {model}")


def _layout(names: Sequence[str]) -> tuple[str, int]:
    found = [(m.group("prefix"), int(m.group("i"))) for n in names if (m := _LAYER_RE.match(n))]
    if not found:
        raise RecipeError(
            "pleas: no BERT-style encoder layer found (no tensor named like "
            "'encoder.layer.0.attention.self.query.weight')"
        )
    prefixes = {p for p, _ in found}
    if len(prefixes) != 1:
        raise RecipeError(f"pleas: encoder layers under several prefixes {sorted(prefixes)}")
    layers = sorted(i for _, i in found)
    if layers != list(range(len(layers))):
        raise RecipeError(f"pleas: encoder layers are not numbered 0..{len(layers) - 1}: {layers}")
    return prefixes.pop(), len(layers)


def encoder_activation_keys(names: Sequence[str]) -> list[str]:
    """The activation keys `merge_encoders` reads for an encoder with these tensor names: per layer the
    inputs of query (key and value read the same rows), attention.output.dense, intermediate.dense and
    output.dense, plus "last_hidden_state". A recorder may drop every other linear input
    (``LinearInputRecorder(model, rename=lambda n: n if n in keys else None)``)."""
    prefix, n_layers = _layout(names)
    keys = [f"{prefix}encoder.layer.{i}.{part}.weight" for i in range(n_layers) for part in (Q, AO, FI, FO)]
    return [*keys, OUTPUT]


def merge_encoders(
    models: Sequence[Mapping[str, Tensor]],
    activations: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]],
    *,
    num_heads: int,
    budget: float = 1.0,
) -> EncoderMerge:
    """PLeaS for two BERT-style encoders (state dicts with the same names and shapes).

    activations(state_dict) runs that model on the merge data and returns {name: rows (N, d)} with, for
    every layer, the inputs of its query, attention.output.dense, intermediate.dense and output.dense
    weights under those weight names (what :class:`sefusion.stats.LinearInputRecorder` records), plus the
    final hidden states under "last_hidden_state"; rows are tokens (padding left out), in the same order
    for both models.
    """
    check_pair(len(models))
    check_budget(budget)
    pair = _EncoderPair(models[0], models[1], num_heads)
    pair.copy_fixed()  # before any activation is computed: refuse what cannot be permuted
    pair.acts = [dict(activations(pair.a)), dict(activations(pair.b))]
    residual = pair.residual_matching()  # 1. one permutation of the residual stream
    qks, vos, ffns = [], [], []
    for i in range(pair.n_layers):
        qk, vo = pair.head_matchings(i)  # 2. attention heads as blocks
        ffn = match(*pair.both(pair.lname(i, FO), pair.a[pair.lname(i, FI)].shape[0]), budget)  # 3. FFN units
        pair.fit(i, residual, qk, vo, ffn)  # 4. least squares, layer by layer
        qks.append(qk)
        vos.append(vo)
        ffns.append(ffn)
    pair.average_rest(residual)  # 5. what is not fit: permuted and averaged
    return EncoderMerge(
        state_dict=pair.out, residual=residual, qk=qks, vo=vos, ffn=ffns,
        intermediate_size=ffns[0].width if ffns else 0,
    )  # fmt: skip


class _EncoderPair:
    """Two BERT-style encoders being merged: their tensors checked and grouped, their activations, and
    the merged state dict as it is filled."""

    def __init__(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor], num_heads: int) -> None:
        self.a, self.b = dict(a), dict(b)
        _check_same_tensors(self.a, self.b)
        self.prefix, self.n_layers = _layout(list(self.a))
        self.hidden = self.a[self.lname(0, Q)].shape[1]
        if num_heads < 1 or self.hidden % num_heads:
            raise RecipeError(f"pleas: num_heads {num_heads} does not divide the hidden size {self.hidden}")
        self.num_heads, self.head_dim = num_heads, self.hidden // num_heads
        self.out: dict[str, Tensor] = {}
        self.acts: list[dict[str, Tensor]] = []
        self._qk_outputs: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._group_names()

    def lname(self, i: int, part: str, kind: str = "weight") -> str:
        return f"{self.prefix}encoder.layer.{i}.{part}.{kind}"

    def _group_names(self) -> None:
        """LayerNorms and embeddings (permuted and averaged), fitted linear layers, the pooler."""
        prefix, a = self.prefix, self.a
        self.ln_names = [f"{prefix}embeddings.LayerNorm.{kind}" for kind in ("weight", "bias")]
        self.fitted: list[str] = []
        for i in range(self.n_layers):
            self.ln_names += [self.lname(i, part, kind) for part in (ALN, OLN) for kind in ("weight", "bias")]
            self.fitted += [
                self.lname(i, part, kind) for part in (Q, K, V, AO, FI, FO) for kind in ("weight", "bias")
            ]
        self.emb_names = [n for e in EMBEDDINGS if (n := f"{prefix}embeddings.{e}.weight") in a]
        if not self.emb_names:
            raise RecipeError(
                f"pleas: no embeddings found (e.g. '{prefix}embeddings.word_embeddings.weight')"
            )
        self.pooler = [n for n in (f"{prefix}pooler.dense.weight", f"{prefix}pooler.dense.bias") if n in a]
        for name in self.ln_names + self.fitted + self.pooler:
            if name not in a:
                raise RecipeError(f"pleas: tensor '{name}' is missing (a BERT-style encoder needs it)")

    def copy_fixed(self) -> None:
        """Non-float tensors equal in both models are copied; any other unknown tensor is refused."""
        known = set(self.ln_names + self.fitted + self.emb_names + self.pooler)
        a, b = self.a, self.b
        for name in a:
            if name in known:
                continue
            if a[name].is_floating_point():
                raise RecipeError(
                    f"pleas: tensor '{name}' is not part of a BERT-style encoder that pleas knows how to "
                    "permute; leave it out (task heads: map them with EncoderMerge.head_input)"
                )
            if not torch.equal(a[name], b[name]):
                raise RecipeError(f"pleas: non-float tensor '{name}' differs between the models")
            self.out[name] = a[name].clone()

    def act(self, side: int, key: str, width: int) -> Tensor:
        if key not in self.acts[side]:
            raise StatisticsError(f"pleas: the activations of model {'AB'[side]} lack '{key}'")
        x = self.acts[side][key].double()
        if x.dim() != 2 or x.shape[1] != width:
            raise StatisticsError(
                f"pleas: activations '{key}' of model {'AB'[side]} have shape {tuple(x.shape)}, expected (rows, {width})"
            )
        return x

    def both(self, key: str, width: int) -> tuple[Tensor, Tensor]:
        xa, xb = self.act(0, key, width), self.act(1, key, width)
        if xa.shape[0] != xb.shape[0]:
            raise StatisticsError(
                f"pleas: activations '{key}' have {xa.shape[0]} rows in model A but {xb.shape[0]} in B"
            )
        return xa, xb

    def residual_matching(self) -> Matching:
        """One permutation of the residual stream, matched on every residual state at once."""
        hidden = self.hidden
        sites = [self.both(self.lname(i, Q), hidden) for i in range(self.n_layers)]
        sites += [self.both(self.lname(i, FI), hidden) for i in range(self.n_layers)]
        sites.append(self.both(OUTPUT, hidden))
        score = sum(correlation(xa, xb) for xa, xb in sites)
        perm, matched = assign(score)  # type: ignore[arg-type]
        return Matching.partial(perm, matched / len(sites), 1.0)

    def outputs(self, x: tuple[Tensor, Tensor], i: int, part: str) -> list[Tensor]:
        """Each model's pre-activation outputs of layer i's `part` on its own inputs."""
        return [
            xs @ sd[self.lname(i, part)].double().T + sd[self.lname(i, part, "bias")].double()
            for xs, sd in zip(x, (self.a, self.b), strict=True)
        ]

    def head_matchings(self, i: int) -> tuple[Matching, Matching]:
        """Layer i's heads by block assignment on within-head matching scores; query and key share one
        permutation within a head, value and the attention output's columns another."""
        xq = self.both(self.lname(i, Q), self.hidden)
        q, k = self.outputs(xq, i, Q), self.outputs(xq, i, K)
        self._qk_outputs = (q, k)  # reused by fit(): the very tensors the matching saw
        c_qk = correlation(q[0], q[1]) + correlation(k[0], k[1])  # (H, H)
        c_vo = correlation(*self.both(self.lname(i, AO), self.hidden))  # (H, H)
        perm_qk, perm_vo = _head_permutations(c_qk, c_vo, self.num_heads, self.head_dim)
        idx = torch.arange(self.hidden)
        qk = Matching.partial(perm_qk, c_qk[idx, perm_qk] / 2, 1.0)
        vo = Matching.partial(perm_vo, c_vo[idx, perm_vo], 1.0)
        return qk, vo

    def fit(self, i: int, residual: Matching, qk: Matching, vo: Matching, ffn: Matching) -> None:
        """Layer i's linear layers fit by least squares on the combined features of the two models."""
        hidden, inter = self.hidden, self.a[self.lname(i, FI)].shape[0]
        xq, ctx = self.both(self.lname(i, Q), hidden), self.both(self.lname(i, AO), hidden)
        xi, z = self.both(self.lname(i, FI), hidden), self.both(self.lname(i, FO), inter)
        x_res = residual.combine(*xq)
        q, k = self._qk_outputs
        self._put(i, Q, x_res, qk.combine(*q), residual, qk)
        self._put(i, K, x_res, qk.combine(*k), residual, qk)
        self._put(i, V, x_res, vo.combine(*self.outputs(xq, i, V)), residual, vo)
        self._put(i, AO, vo.combine(*ctx), residual.combine(*self.outputs(ctx, i, AO)), vo, residual)
        self._put(i, FI, residual.combine(*xi), ffn.combine(*self.outputs(xi, i, FI)), residual, ffn)
        self._put(i, FO, ffn.combine(*z), residual.combine(*self.outputs(z, i, FO)), ffn, residual)

    def _put(self, i: int, part: str, x: Tensor, y: Tensor, m_in: Matching, m_out: Matching) -> None:
        w, bias = fit_layer(x, y, m_in, m_out, self.lname(i, part))
        self.out[self.lname(i, part)], self.out[self.lname(i, part, "bias")] = w.float(), bias.float()

    def average_rest(self, residual: Matching) -> None:
        """LayerNorms and embeddings permuted along the residual stream and averaged; the pooler's
        columns read the residual stream, its rows are its own outputs."""
        a, b = self.a, self.b
        for name in self.ln_names + self.emb_names:
            ta, tb = a[name].double(), b[name].double()
            rows = ta if ta.dim() == 2 else ta[None]
            merged = residual.combine(rows, tb if tb.dim() == 2 else tb[None])
            self.out[name] = (merged if ta.dim() == 2 else merged[0]).float()
        pooler_w, pooler_b = f"{self.prefix}pooler.dense.weight", f"{self.prefix}pooler.dense.bias"
        if pooler_w in a:
            self.out[pooler_w] = residual.combine(a[pooler_w].double(), b[pooler_w].double()).float()
            self.out[pooler_b] = ((a[pooler_b].double() + b[pooler_b].double()) / 2).float()


def _check_same_tensors(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            side = "B" if name not in b else "A"
            raise RecipeError(f"pleas: tensor '{name}' is missing from model {side}")
        if tuple(a[name].shape) != tuple(b[name].shape):
            raise RecipeError(
                f"pleas: tensor '{name}' has shape {tuple(a[name].shape)} in model A but {tuple(b[name].shape)} in B"
            )


def _head_permutations(c_qk: Tensor, c_vo: Tensor, num_heads: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """Heads matched as blocks (assignment on each head pair's summed within-head scores), then within
    each matched pair the query/key dims and the value dims by their own assignments."""
    inner: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
    head_score = torch.zeros((num_heads, num_heads), dtype=torch.float64)
    for ha in range(num_heads):
        sa = slice(ha * head_dim, (ha + 1) * head_dim)
        for hb in range(num_heads):
            sb = slice(hb * head_dim, (hb + 1) * head_dim)
            p_qk, s_qk = assign(c_qk[sa, sb])
            p_vo, s_vo = assign(c_vo[sa, sb])
            inner[ha, hb] = (p_qk, p_vo)
            head_score[ha, hb] = s_qk.sum() + s_vo.sum()
    head_perm, _ = assign(head_score)
    hidden = num_heads * head_dim
    perm_qk = torch.empty(hidden, dtype=torch.long)
    perm_vo = torch.empty(hidden, dtype=torch.long)
    for ha in range(num_heads):
        hb = int(head_perm[ha])
        p_qk, p_vo = inner[ha, hb]
        perm_qk[ha * head_dim : (ha + 1) * head_dim] = hb * head_dim + p_qk
        perm_vo[ha * head_dim : (ha + 1) * head_dim] = hb * head_dim + p_vo
    return perm_qk, perm_vo


# --------------------------------------------------------------------------- registration


@register(
    "pleas", paper="https://arxiv.org/abs/2407.02447", kind="whole_model", needs_base=False,
    per_expert=("examples",), pair_only=True, whole_model=merge_encoders, study_fuse="pleas_fuse",
    study=StudyGrid(rank=110, full=({"budget": 1.0},), curve=("budget", (0.75, 0.5))),
)  # fmt: skip
def pleas(*, budget: Budget = 1.0, examples: PosInt = 256) -> None:
    """PLeaS: match two models' hidden units on activations, then fit each layer by least squares.

    A whole-model method (permutations tie tensors together): `merge_encoders` runs with each expert's
    activations on `examples` examples of the two tasks; `budget` in (0, 1] is the share of hidden units
    merged (below 1 the least-matched units of both models are kept: a wider model). In the study, the
    row is the base's size (budget 1.0) and the smaller budgets are a size/score curve beside it.
    Nasery et al., "PLeaS: Merging Models with Permutations and Least Squares", https://arxiv.org/abs/2407.02447
    """
