"""The triphone decision tree: Kaldi's acc-tree-stats / cluster-phones / build-tree, in numpy.

kaldi-hmm-gmm binds Kaldi's ContextDependency but not the tools that grow one, so this module
grows it and hands it to Kaldi in Kaldi's own binary format:

1. :func:`accumulate_tree_stats` -- per (left, center, right, pdf-class) event, the count,
   sum and sum of squares of the features, from a monophone alignment (acc-tree-stats).
2. :func:`phone_questions` -- phone sets to ask about, from a top-down bisection of the base
   phones by likelihood (cluster-phones), plus the word-position sets (extra questions).
3. :func:`build_tree` -- one root per phone set (position variants of a base phone share it),
   split first by pdf-class (Kaldi's "not-shared split" roots), then greedily: the leaf
   whose best question on the left, center or right phone gains most log-likelihood splits
   next, while gain >= min_gain, both sides keep min_count frames and leaves < max_leaves.
4. :func:`to_kaldi_binary` / :func:`load_context_dependency` -- the EventMap as Kaldi writes
   it, loaded into ``kaldi_hmm_gmm.ContextDependency``.
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass, field

import kaldi_hmm_gmm as khg
import numpy as np

PDF_CLASS_KEY = -1  # Kaldi's kPdfClass
CONTEXT_WIDTH = 3  # triphone: keys 0 (left), 1 (center), 2 (right)
CENTRAL_POSITION = 1
LOG_2PI = float(np.log(2 * np.pi))
TREE_BLOCK_ROWS = 1 << 16  # frames summed at a time (memory: 2 x 8 bytes x their dimension)


@dataclass
class TreeStats:
    """Sufficient statistics of one diagonal Gaussian per context event."""

    events: np.ndarray  # (E, 4) int: left, center, right, pdf_class
    count: np.ndarray  # (E,)
    sum: np.ndarray  # (E, D)
    sumsq: np.ndarray  # (E, D)


def gaussian_objf(count: np.ndarray, total: np.ndarray, sumsq: np.ndarray, var_floor: float) -> np.ndarray:
    """Log-likelihood of the data under its own ML diagonal Gaussian (Kaldi's GaussClusterable::Objf).

    Works on stacked stats: ``count`` (...,), ``total``/``sumsq`` (..., D). Variances are
    floored at ``var_floor``; an empty cluster scores 0.
    """
    count = np.asarray(count, dtype=np.float64)
    safe = np.where(count > 0, count, 1.0)[..., None]
    mean = total / safe
    var = sumsq / safe - mean * mean
    floored = np.maximum(var, var_floor)
    dim = total.shape[-1]
    per_frame = -0.5 * (var / floored).sum(-1) - 0.5 * (np.log(floored).sum(-1) + LOG_2PI * dim)
    return np.where(count > 0, per_frame * count, 0.0)


def phone_instances(phones: np.ndarray, hmm_states: np.ndarray) -> np.ndarray:
    """Index of the phone instance each frame belongs to.

    A new instance starts where the phone changes, or where HMM state 0 is entered from a
    later state (the same phone twice in a row); our topologies never re-enter state 0.
    """
    starts = np.ones(len(phones), dtype=bool)
    starts[1:] = (phones[1:] != phones[:-1]) | ((hmm_states[1:] == 0) & (hmm_states[:-1] != 0))
    return np.cumsum(starts) - 1


def frame_events(phones: np.ndarray, hmm_states: np.ndarray, pdf_classes: np.ndarray) -> np.ndarray:
    """(T, 4) events: left phone, center phone, right phone (0 at utterance edges), pdf-class."""
    instance = phone_instances(phones, hmm_states)
    first = np.flatnonzero(np.r_[True, instance[1:] != instance[:-1]])
    sequence = phones[first]
    padded = np.r_[0, sequence, 0]
    return np.stack([padded[instance], sequence[instance], padded[instance + 2], pdf_classes], axis=1)


def accumulate_tree_stats(events: np.ndarray, frames: np.ndarray, rows: np.ndarray | None = None,
                          block_rows: int = TREE_BLOCK_ROWS) -> TreeStats:
    """Sum frames' stats by identical event (what acc-tree-stats writes to treeacc).

    Event i's frame is ``frames[rows[i]]`` (``rows`` None: ``frames[i]``), so ``frames`` may be a
    memory-mapped feature store. The float64 sums are made over blocks of about ``block_rows``
    frames, each block holding whole events: every event's sum is one reduction over its own
    frames in order, so the bits are those of a single pass whatever the block size.
    """
    unique, inverse = np.unique(events, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    count = np.bincount(inverse, minlength=len(unique))
    bounds = np.r_[0, np.cumsum(count)]  # event e's frames: order[bounds[e]:bounds[e + 1]]
    source = order if rows is None else np.asarray(rows)[order]
    total = np.zeros((len(unique), frames.shape[1]))
    sumsq = np.zeros_like(total)
    first = 0
    while first < len(unique):
        last = max(first + 1, int(np.searchsorted(bounds, bounds[first] + block_rows, side="right")) - 1)  # events [first, last)
        x = np.asarray(frames[source[bounds[first]:bounds[last]]], dtype=np.float64)
        starts = bounds[first:last] - bounds[first]
        total[first:last] = np.add.reduceat(x, starts, axis=0)
        sumsq[first:last] = np.add.reduceat(x * x, starts, axis=0)
        first = last
    return TreeStats(events=unique.astype(np.int64), count=count.astype(np.float64), sum=total, sumsq=sumsq)


def _bisect(names: list[str], count: np.ndarray, total: np.ndarray, sumsq: np.ndarray, var_floor: float) -> list[list[str]]:
    """All clusters of a top-down binary clustering of ``names`` (their pooled stats given).

    Each split is a 2-means on likelihood: seeded by the pair that loses most when merged,
    then every member moves to the side whose merge costs it least, until nothing moves.
    """
    if len(names) < 2:
        return []
    objf = gaussian_objf(count, total, sumsq, var_floor)

    def merged_loss(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        joint = gaussian_objf(count[a] + count[b], total[a] + total[b], sumsq[a] + sumsq[b], var_floor)
        return objf[a] + objf[b] - joint

    idx = np.arange(len(names))
    pairs = np.array([(i, j) for i in idx for j in idx if i < j])
    seed_a, seed_b = pairs[np.argmax(merged_loss(pairs[:, 0], pairs[:, 1]))]
    side = np.array([merged_loss(np.array([i]), np.array([seed_a]))[0] > merged_loss(np.array([i]), np.array([seed_b]))[0] for i in idx])
    side[seed_a], side[seed_b] = False, True
    for _ in range(20):
        centers = [
            (count[side == s].sum(), total[side == s].sum(0), sumsq[side == s].sum(0)) for s in (False, True)
        ]
        cost = np.stack(
            [
                gaussian_objf(c, t, q, var_floor) - gaussian_objf(c + count, t + total, q + sumsq, var_floor) + objf
                for c, t, q in centers
            ],
            axis=1,
        )  # how much likelihood each member loses by joining each side
        new_side = cost[:, 1] < cost[:, 0]
        if new_side.all() or not new_side.any() or (new_side == side).all():
            break
        side = new_side
    groups = [[n for n, s in zip(names, side) if s == flag] for flag in (False, True)]
    clusters = [g for g in groups if 1 < len(g) < len(names)] + [g for g in groups if len(g) == 1]
    for group, flag in zip(groups, (False, True)):
        mask = side == flag
        clusters += _bisect(group, count[mask], total[mask], sumsq[mask], var_floor)
    return clusters


def phone_questions(stats: TreeStats, phone_sets: list[list[int]], position_sets: list[list[int]], var_floor: float) -> list[np.ndarray]:
    """Question sets (sorted phone ids): clusters of phone sets by their central-state stats, plus positions.

    Like cluster-phones, the stats pooled for a phone set are those of its middle pdf-class
    (1) in every context. Each cluster stands for all position variants of its base phones.
    """
    set_of = {p: i for i, s in enumerate(phone_sets) for p in s}
    central = stats.events[:, 3] == 1
    which = np.array([set_of.get(int(c), -1) for c in stats.events[central, 1]])
    count = np.zeros(len(phone_sets))
    total = np.zeros((len(phone_sets), stats.sum.shape[1]))
    sumsq = np.zeros_like(total)
    valid = which >= 0
    np.add.at(count, which[valid], stats.count[central][valid])
    np.add.at(total, which[valid], stats.sum[central][valid])
    np.add.at(sumsq, which[valid], stats.sumsq[central][valid])
    seen = [i for i in range(len(phone_sets)) if count[i] > 0]
    clusters = _bisect([str(i) for i in seen], count[seen], total[seen], sumsq[seen], var_floor)
    questions = {tuple(sorted(p for i in cluster for p in phone_sets[int(i)])) for cluster in clusters}
    questions |= {tuple(s) for s in phone_sets}
    questions |= {tuple(sorted(s)) for s in position_sets if s}
    return [np.array(q, dtype=np.int64) for q in sorted(questions)]


# ---------------------------------------------------------------------------------------------
# Tree growing


@dataclass(eq=False)
class Leaf:
    rows: np.ndarray  # indices into TreeStats
    pdf_id: int = -1


@dataclass(eq=False)
class Split:
    key: int
    yes_set: np.ndarray
    yes: "Node"
    no: "Node"


@dataclass(eq=False)
class Table:
    key: int
    children: list["Node | None"] = field(default_factory=list)


Node = Leaf | Split | Table


def question_membership(questions: list[np.ndarray], num_phones: int) -> np.ndarray:
    """(Q, num_phones) boolean: is phone p in question q."""
    member = np.zeros((len(questions), num_phones), dtype=bool)
    for q, phones in enumerate(questions):
        member[q, phones[phones < num_phones]] = True
    return member


def best_split(
    stats: TreeStats, rows: np.ndarray, member: np.ndarray, keys: tuple[int, ...], min_count: float, var_floor: float
) -> tuple[float, int, int] | None:
    """(gain, key, question index) of the question that most raises the log-likelihood of ``rows``."""
    count, total, sumsq = stats.count[rows], stats.sum[rows], stats.sumsq[rows]
    parent = gaussian_objf(count.sum(), total.sum(0), sumsq.sum(0), var_floor)
    best: tuple[float, int, int] | None = None
    for key in keys:
        yes = member[:, stats.events[rows, key]].astype(np.float64)  # (Q, R)
        yes_count = yes @ count
        no_count = count.sum() - yes_count
        ok = (yes_count >= min_count) & (no_count >= min_count)
        if not ok.any():
            continue
        yes_total, yes_sumsq = yes @ total, yes @ sumsq
        gain = (
            gaussian_objf(yes_count, yes_total, yes_sumsq, var_floor)
            + gaussian_objf(no_count, total.sum(0) - yes_total, sumsq.sum(0) - yes_sumsq, var_floor)
            - parent
        )
        gain[~ok] = -np.inf
        q = int(np.argmax(gain))
        if best is None or gain[q] > best[0]:
            best = (float(gain[q]), key, q)
    return best


def build_tree(
    stats: TreeStats,
    phone_sets: list[list[int]],
    num_pdf_classes: dict[int, int],
    questions: list[np.ndarray],
    max_leaves: int,
    min_count: float,
    min_gain: float,
    var_floor: float,
) -> tuple[Node, list[Leaf]]:
    """Grow the tree greedily; returns its root and its leaves numbered by pdf-id."""
    leaves: list[Leaf] = []
    roots: list[tuple[list[int], Node]] = []
    for phone_set in phone_sets:
        num_classes = num_pdf_classes[phone_set[0]]
        in_set = np.isin(stats.events[:, 1], phone_set)
        table = Table(PDF_CLASS_KEY)
        for pdf_class in range(num_classes):
            leaf = Leaf(np.flatnonzero(in_set & (stats.events[:, 3] == pdf_class)))
            table.children.append(leaf)
            leaves.append(leaf)
        roots.append((phone_set, table))

    keys = (0, CENTRAL_POSITION, 2)  # a center question only splits a root's position variants
    member = question_membership(questions, int(stats.events[:, :3].max()) + 1)
    heap: list[tuple[float, int, int, np.ndarray, Leaf]] = []
    tiebreak = 0

    def consider(leaf: Leaf) -> None:
        nonlocal tiebreak
        found = best_split(stats, leaf.rows, member, keys, min_count, var_floor)
        if found is not None and found[0] >= min_gain:
            gain, key, q = found
            heapq.heappush(heap, (-gain, tiebreak, key, questions[q], leaf))
            tiebreak += 1

    for leaf in leaves:
        consider(leaf)
    parent_of: dict[int, tuple[Table | Split, str | int]] = {}
    for _, table in roots:
        for i, child in enumerate(table.children):
            parent_of[id(child)] = (table, i)

    while heap and len(leaves) < max_leaves:
        _, _, key, yes_set, leaf = heapq.heappop(heap)
        in_yes = np.isin(stats.events[leaf.rows, key], yes_set)
        yes, no = Leaf(leaf.rows[in_yes]), Leaf(leaf.rows[~in_yes])
        split = Split(key, yes_set, yes, no)
        holder, slot = parent_of.pop(id(leaf))
        if isinstance(holder, Table):
            holder.children[slot] = split
        else:
            setattr(holder, slot, split)
        parent_of[id(yes)] = (split, "yes")
        parent_of[id(no)] = (split, "no")
        leaves.remove(leaf)
        leaves += [yes, no]
        consider(yes)
        consider(no)

    root = _split_roots(roots)
    numbered = list(iter_leaves(root))
    for pdf_id, leaf in enumerate(numbered):
        leaf.pdf_id = pdf_id
    return root, numbered


def _split_roots(roots: list[tuple[list[int], Node]]) -> Node:
    """Route the central phone to its root through a balanced chain of phone-set questions."""
    if len(roots) == 1:
        return roots[0][1]
    half = len(roots) // 2
    yes_set = np.array(sorted(p for phones, _ in roots[:half] for p in phones), dtype=np.int64)
    return Split(CENTRAL_POSITION, yes_set, _split_roots(roots[:half]), _split_roots(roots[half:]))


def iter_leaves(node: Node):
    """Leaves in the order Kaldi's EventMap writer visits them (yes before no, table in order)."""
    if isinstance(node, Leaf):
        yield node
    elif isinstance(node, Split):
        yield from iter_leaves(node.yes)
        yield from iter_leaves(node.no)
    else:
        for child in node.children:
            if child is not None:
                yield from iter_leaves(child)


# ---------------------------------------------------------------------------------------------
# Kaldi's binary format


def _token(name: str) -> bytes:
    return name.encode() + b" "


def _int32(value: int) -> bytes:
    return b"\x04" + struct.pack("<i", value)


def _uint32(value: int) -> bytes:
    return b"\xfc" + struct.pack("<I", value)  # size byte -4: unsigned 4-byte type


def _event_map(node: Node | None) -> bytes:
    if node is None:
        return _token("NULL")
    if isinstance(node, Leaf):
        return _token("CE") + _int32(node.pdf_id)
    if isinstance(node, Split):
        values = np.asarray(node.yes_set, dtype="<i4")
        yes_set = b"\x04" + struct.pack("<i", len(values)) + values.tobytes()
        return _token("SE") + _int32(node.key) + yes_set + _token("{") + _event_map(node.yes) + _event_map(node.no) + _token("}")
    body = b"".join(_event_map(child) for child in node.children)
    return _token("TE") + _int32(node.key) + _uint32(len(node.children)) + _token("(") + body + _token(")")


def to_kaldi_binary(root: Node, context_width: int = CONTEXT_WIDTH, central_position: int = CENTRAL_POSITION) -> bytes:
    """The ContextDependency body exactly as Kaldi's ``Write(os, binary=true)`` emits it."""
    return (
        _token("ContextDependency")
        + _int32(context_width)
        + _int32(central_position)
        + _token("ToPdf")
        + _event_map(root)
        + _token("EndContextDependency")
    )


def load_context_dependency(data: bytes) -> khg.ContextDependency:
    """Kaldi reads it (the binding's pickle path calls ContextDependency::Read)."""
    tree = khg.ContextDependency.__new__(khg.ContextDependency)
    tree.__setstate__((list(np.frombuffer(data, dtype=np.int8)),))
    return tree

