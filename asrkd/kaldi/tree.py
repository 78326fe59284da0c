"""The triphone decision tree: Kaldi's acc-tree-stats / cluster-phones / build-tree, in numpy.

kaldi-hmm-gmm binds Kaldi's ContextDependency but not the tools that grow one, so this module
grows it and hands it to Kaldi in Kaldi's own binary format:

1. :func:`accumulate_tree_stats` -- per (left, center, right, pdf-class) event, the count,
   sum and sum of squares of the features, from a monophone alignment (acc-tree-stats), in
   memory that does not grow with the frames.
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
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import kaldi_hmm_gmm as khg
import numpy as np

PDF_CLASS_KEY = -1  # Kaldi's kPdfClass
CONTEXT_WIDTH = 3  # triphone: keys 0 (left), 1 (center), 2 (right)
CENTRAL_POSITION = 1
LOG_2PI = float(np.log(2 * np.pi))
TREE_BLOCK_ROWS = 1 << 16  # frames summed at a time (memory: 2 x 8 bytes x their dimension)
TREE_BUCKET_FRAMES = 1 << 19  # frames whose events are summed at a time (memory: about 60 bytes each, 30 MB)


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


def event_keys(events: np.ndarray, radix: tuple[int, int, int, int]) -> np.ndarray:
    """One int64 per (left, center, right, pdf-class) event, in mixed radix: keys sort as the
    events do lexicographically (what np.unique over the (T, 4) rows gives)."""
    keys = np.zeros(len(events), dtype=np.int64)
    for column, base in enumerate(radix):
        keys = keys * base + events[:, column]
    return keys


def key_events(keys: np.ndarray, radix: tuple[int, int, int, int]) -> np.ndarray:
    """The (E, 4) events of ``keys`` (event_keys' inverse)."""
    events = np.zeros((len(keys), 4), dtype=np.int64)
    for column in range(3, -1, -1):
        keys, events[:, column] = np.divmod(keys, radix[column])
    return events


def accumulate_tree_stats(utterances: Iterable[tuple[np.ndarray, int]], num_frames: int, frames: np.ndarray,
                          radix: tuple[int, int, int, int], scratch: Path, bucket_frames: int = TREE_BUCKET_FRAMES,
                          block_rows: int = TREE_BLOCK_ROWS) -> TreeStats:
    """Sum frames' stats by identical event (what acc-tree-stats writes to treeacc).

    ``utterances`` yields each utterance's (T, 4) events and the store row of its first frame
    (``num_frames`` in all); ``frames`` may be a memory-mapped store. Every event's float64 sums
    are one reduction (np.add.reduceat) over its own frames in the order they come, so the bits
    do not depend on how the work is cut. Memory does not grow with the frames: each frame's
    event key and row go to files in ``scratch``, sorted there into key-ordered buckets of about
    ``bucket_frames`` frames (a counting sort, order kept within a bucket), and a bucket at a
    time is summed, its frames read in blocks of ``block_rows``.
    """
    chunk = 1 << 20
    with tempfile.TemporaryDirectory(dir=scratch, prefix="tree_stats.") as tmp:
        def scratch_array(name: str) -> np.ndarray:
            return np.lib.format.open_memmap(Path(tmp) / f"{name}.npy", mode="w+", dtype=np.int64, shape=(num_frames,))

        keys, rows = scratch_array("keys"), scratch_array("rows")
        counts: dict[int, int] = {}
        position = 0
        for events, first_row in utterances:
            utterance_keys = event_keys(events, radix)
            keys[position:position + len(events)] = utterance_keys
            rows[position:position + len(events)] = np.arange(first_row, first_row + len(events))
            position += len(events)
            for key, count in zip(*np.unique(utterance_keys, return_counts=True)):
                counts[int(key)] = counts.get(int(key), 0) + int(count)
        if position != num_frames:
            raise ValueError(f"tree statistics: {position} events for {num_frames} frames")
        firsts, sizes = _buckets(sorted(counts.items()), bucket_frames)
        bucket_keys, bucket_rows = scratch_array("bucket_keys"), scratch_array("bucket_rows")
        filled = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)  # where each bucket's next frame goes
        for start in range(0, num_frames, chunk):
            chunk_keys, chunk_rows = np.asarray(keys[start:start + chunk]), np.asarray(rows[start:start + chunk])
            bucket = np.searchsorted(firsts, chunk_keys, side="right") - 1
            order = np.argsort(bucket, kind="stable")
            for b, begin, end in _runs(bucket[order]):
                bucket_keys[filled[b]:filled[b] + end - begin] = chunk_keys[order[begin:end]]
                bucket_rows[filled[b]:filled[b] + end - begin] = chunk_rows[order[begin:end]]
                filled[b] += end - begin
        bounds = np.r_[0, np.cumsum(sizes)].astype(np.int64)
        parts = [_bucket_stats(np.asarray(bucket_keys[bounds[b]:bounds[b + 1]]), np.asarray(bucket_rows[bounds[b]:bounds[b + 1]]),
                               frames, block_rows) for b in range(len(sizes))]
        del keys, rows, bucket_keys, bucket_rows  # the maps close before their directory goes
    dim = frames.shape[1]
    return TreeStats(events=key_events(np.concatenate([p[0] for p in parts] or [np.zeros(0, dtype=np.int64)]), radix),
                     count=np.concatenate([p[1] for p in parts] or [np.zeros(0)]),
                     sum=np.concatenate([p[2] for p in parts] or [np.zeros((0, dim))]),
                     sumsq=np.concatenate([p[3] for p in parts] or [np.zeros((0, dim))]))


def _buckets(key_counts: list[tuple[int, int]], bucket_frames: int) -> tuple[np.ndarray, list[int]]:
    """Consecutive key ranges of about ``bucket_frames`` frames (an event larger than that alone):
    each bucket's first key and its frames."""
    firsts: list[int] = []
    sizes: list[int] = []
    for key, count in key_counts:
        if not sizes or sizes[-1] + count > bucket_frames:
            firsts.append(key)
            sizes.append(0)
        sizes[-1] += count
    return np.asarray(firsts, dtype=np.int64), sizes


def _runs(values: np.ndarray) -> list[tuple[int, int, int]]:
    """(value, begin, end) of each run of equal values in a sorted array."""
    edges = np.flatnonzero(np.diff(values)) + 1
    begins, ends = np.r_[0, edges], np.r_[edges, len(values)]
    return [(int(values[b]), int(b), int(e)) for b, e in zip(begins, ends)] if len(values) else []


def _bucket_stats(keys: np.ndarray, rows: np.ndarray, frames: np.ndarray, block_rows: int) -> tuple[np.ndarray, ...]:
    """A bucket's unique keys, their counts, sums and sums of squares (whole events per block)."""
    unique, inverse = np.unique(keys, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    count = np.bincount(inverse, minlength=len(unique))
    bounds = np.r_[0, np.cumsum(count)]  # event e's frames: source[bounds[e]:bounds[e + 1]]
    source = rows[order]
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
    return unique, count.astype(np.float64), total, sumsq


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

