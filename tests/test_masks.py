"""Property tests for the mask logic (``fascore.canonical.masks``, ``fascore.plan``) and the layout
helpers (``fascore.canonical.layouts``).

The dense truth is written here, independently, from the formula in masks.py's module docstring:

    takes_part(b, n, i, j) = (lo <= j - i <= hi  or  j < prefix[b])  and not explicit[b, n, i, j]

Every property compares fascore's tile / plan / rectangle machinery with that truth, for random
geometries, bands (including unbounded ends and empty bands), per-batch prefixes, explicit masks
(bool or uint8, broadcast over batch and/or heads, sometimes non-contiguous, with block structure
so that whole tiles are masked / unmasked) and random tile sizes.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fascore.plan import rectangles
from fascore.canonical.layouts import LAYOUTS, Batch, from_bnsd, tnd_batches, tnd_rows, tnd_stats_view, to_bnsd
from fascore.canonical.masks import UNBOUNDED, MaskSpec
from fascore.plan import EMPTY, FULL, PARTIAL, plan_blocks

CPU = torch.device("cpu")
PROPS = settings(derandomize=True, max_examples=120, deadline=None)
LAYOUT_PROPS = settings(derandomize=True, max_examples=60, deadline=None)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------
@st.composite
def explicit_masks(draw, b: int, n: int, sq: int, skv: int) -> torch.Tensor:
    """A [B or 1, N or 1, sq, skv] mask (nonzero = masked out) with block structure.

    The mask is built from cells of a random size, each cell all-kept, all-masked or random, so
    that whole tiles are FULL/EMPTY often enough to matter.
    """
    bm = draw(st.sampled_from([1, b]))
    nm = draw(st.sampled_from([1, n]))
    cell = draw(st.sampled_from([1, 3, 4, 8, 16]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    cq, ck = -(-sq // cell), -(-skv // cell)
    p_kept = draw(st.sampled_from([1 / 3, 0.8]))
    u = torch.rand(1 if draw(st.booleans()) else bm, 1 if draw(st.booleans()) else nm, cq, ck, generator=g)
    kind = torch.where(u < p_kept, 0, torch.where(u < (1 + p_kept) / 2, 1, 2))  # 0 kept, 1 masked, 2 random
    kind = kind.expand(bm, nm, cq, ck)
    kind = kind.repeat_interleave(cell, 2).repeat_interleave(cell, 3)[:, :, :sq, :skv]
    density = draw(st.sampled_from([0.1, 0.5, 0.9]))
    rand = torch.rand(bm, nm, sq, skv, generator=g) < density
    masked = (kind == 1) | ((kind == 2) & rand)
    dtype = draw(st.sampled_from(["bool", "uint8", "uint8-values"]))
    if dtype == "bool":
        m = masked
    elif dtype == "uint8":
        m = masked.to(torch.uint8)
    else:  # any nonzero uint8 value means masked out
        m = masked.to(torch.uint8) * torch.randint(1, 256, masked.shape, generator=g, dtype=torch.uint8)
    if draw(st.booleans()):  # a non-contiguous view, as TND's per-batch slices are
        big = torch.zeros(bm, nm, sq + 3, skv + 5, dtype=m.dtype)
        big[:, :, 2:2 + sq, 1:1 + skv] = m
        m = big[:, :, 2:2 + sq, 1:1 + skv]
    return m


band_end = st.one_of(st.integers(-90, 90), st.integers(-90, 90), st.just(None))


@st.composite
def mask_cases(draw):
    """(MaskSpec, B, N) with sq, skv in 1..80."""
    sq = draw(st.integers(1, 80))
    skv = draw(st.integers(1, 80))
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 3))
    lo = draw(band_end)
    hi = draw(band_end)
    lo = -UNBOUNDED if lo is None else lo
    hi = UNBOUNDED if hi is None else hi
    prefix = None
    if draw(st.booleans()):
        prefix = tuple(draw(st.lists(st.integers(0, skv + 3), min_size=b, max_size=b)))
    explicit = draw(explicit_masks(b, n, sq, skv)) if draw(st.booleans()) else None
    return MaskSpec(sq, skv, lo, hi, prefix=prefix, explicit=explicit), b, n


tile_sizes = st.tuples(st.integers(1, 40), st.integers(1, 40))


# ----------------------------------------------------------------------------------------------
# The independent truth
# ----------------------------------------------------------------------------------------------
def truth(mask: MaskSpec, b: int, n: int) -> torch.Tensor:
    """bool [B, N, Sq, Skv] from the module docstring's formula, one element at a time in spirit."""
    i = torch.arange(mask.sq).view(1, 1, -1, 1)
    j = torch.arange(mask.skv).view(1, 1, 1, -1)
    part = (j - i >= mask.lo) & (j - i <= mask.hi)
    part = part.expand(b, n, mask.sq, mask.skv)
    if mask.prefix is not None:
        p = torch.tensor(mask.prefix).view(-1, 1, 1, 1)
        part = part | (j < p)
    if mask.explicit is not None:
        part = part & (mask.explicit == 0)
    return part.expand(b, n, mask.sq, mask.skv).clone()


def _grid(sq: int, skv: int, bq: int, bk: int):
    for qb in range(-(-sq // bq)):
        for kb in range(-(-skv // bk)):
            yield qb, kb, qb * bq, min((qb + 1) * bq, sq), kb * bk, min((kb + 1) * bk, skv)


def test_truth_helper_small_example():
    """The test's own truth on a hand-checked case (mode-5-like: causal + prefix + explicit)."""
    ex = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    ex[0, 0, 2, 0] = True
    m = MaskSpec(3, 4, hi=1, prefix=(3,), explicit=ex)
    expected = torch.tensor([[1, 1, 1, 0],
                             [1, 1, 1, 0],
                             [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(truth(m, 1, 1)[0, 0], expected)
    assert torch.equal(m.materialize().expand(1, 1, 3, 4)[0, 0], expected)


# ----------------------------------------------------------------------------------------------
# MaskSpec: materialize, tile
# ----------------------------------------------------------------------------------------------
@PROPS
@given(mask_cases())
def test_materialize_equals_truth(case):
    mask, b, n = case
    m = mask.materialize()
    assert m.dtype == torch.bool
    assert m.dim() == 4 and m.shape[-2:] == (mask.sq, mask.skv)
    assert torch.equal(m.expand(b, n, mask.sq, mask.skv), truth(mask, b, n))


@PROPS
@given(mask_cases(), tile_sizes)
def test_tile_equals_slices_of_materialize(case, tiles):
    mask, b, n = case
    bq, bk = tiles
    dense = mask.materialize().expand(b, n, mask.sq, mask.skv)
    want_all = truth(mask, b, n)
    for _, _, i0, i1, j0, j1 in _grid(mask.sq, mask.skv, bq, bk):
        t = mask.tile(i0, i1, j0, j1, CPU)
        want = dense[:, :, i0:i1, j0:j1]
        assert torch.equal(want, want_all[:, :, i0:i1, j0:j1])
        if t is None:
            assert want.all(), f"tile [{i0}:{i1}, {j0}:{j1}] is None but not everything takes part"
        else:
            assert t.dtype == torch.bool
            assert torch.equal(t.expand(b, n, i1 - i0, j1 - j0), want), f"tile [{i0}:{i1}, {j0}:{j1}]"


@PROPS
@given(mask_cases(), st.integers(0, 79), st.integers(1, 80), st.integers(0, 79), st.integers(1, 80))
def test_tile_arbitrary_windows(case, i0, h, j0, w):
    """Any window, not only grid-aligned ones (the fused backward's rectangles are arbitrary)."""
    mask, b, n = case
    i0, j0 = min(i0, mask.sq - 1), min(j0, mask.skv - 1)
    i1, j1 = min(i0 + h, mask.sq), min(j0 + w, mask.skv)
    want = truth(mask, b, n)[:, :, i0:i1, j0:j1]
    t = mask.tile(i0, i1, j0, j1, CPU)
    got = torch.ones_like(want) if t is None else t.expand_as(want)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# plan_blocks
# ----------------------------------------------------------------------------------------------
@PROPS
@given(mask_cases(), tile_sizes)
def test_plan_blocks_sound(case, tiles):
    """FULL => every (b, n, i, j) of the tile takes part; EMPTY => none does."""
    mask, b, n = case
    bq, bk = tiles
    kinds = plan_blocks(mask, bq, bk, CPU)
    nq, nk = -(-mask.sq // bq), -(-mask.skv // bk)
    assert kinds.shape == (nq, nk) and kinds.dtype == torch.int8
    assert set(kinds.unique().tolist()) <= {EMPTY, PARTIAL, FULL}
    want = truth(mask, b, n)
    for qb, kb, i0, i1, j0, j1 in _grid(mask.sq, mask.skv, bq, bk):
        t = want[:, :, i0:i1, j0:j1]
        kind = int(kinds[qb, kb])
        if kind == FULL:
            assert t.all(), f"tile ({qb}, {kb}) = [{i0}:{i1}, {j0}:{j1}] is FULL but has masked positions"
        elif kind == EMPTY:
            assert not t.any(), f"tile ({qb}, {kb}) = [{i0}:{i1}, {j0}:{j1}] is EMPTY but has positions taking part"


@PROPS
@given(st.integers(1, 80), st.integers(1, 80), band_end, band_end, tile_sizes)
def test_plan_blocks_exact_for_pure_bands(sq, skv, lo, hi, tiles):
    """Without prefix and explicit mask the band is classified analytically and exactly: a tile's
    j - i takes every integer value between its extremes, so FULL/EMPTY are also complete.
    (An empty band, lo > hi, never reaches the engines: validation rejects it.)"""
    lo = -UNBOUNDED if lo is None else lo
    hi = UNBOUNDED if hi is None else hi
    if lo > hi:
        lo, hi = hi, lo
    mask = MaskSpec(sq, skv, lo, hi)
    bq, bk = tiles
    kinds = plan_blocks(mask, bq, bk, CPU)
    want = truth(mask, 1, 1)[0, 0]
    for qb, kb, i0, i1, j0, j1 in _grid(sq, skv, bq, bk):
        t = want[i0:i1, j0:j1]
        expected = FULL if t.all() else EMPTY if not t.any() else PARTIAL
        assert int(kinds[qb, kb]) == expected, f"tile ({qb}, {kb})"


@PROPS
@given(mask_cases(), tile_sizes)
def test_plan_blocks_exact_when_explicit_decides(case, tiles):
    """With an explicit mask and no band/prefix, a tile whose explicit part is all-kept (in every
    batch and head) is FULL and one that is all-masked is EMPTY."""
    mask, b, n = case
    if mask.explicit is None:
        return
    mask = MaskSpec(mask.sq, mask.skv, explicit=mask.explicit)
    bq, bk = tiles
    kinds = plan_blocks(mask, bq, bk, CPU)
    want = truth(mask, b, n)
    for qb, kb, i0, i1, j0, j1 in _grid(mask.sq, mask.skv, bq, bk):
        t = want[:, :, i0:i1, j0:j1]
        expected = FULL if t.all() else EMPTY if not t.any() else PARTIAL
        assert int(kinds[qb, kb]) == expected, f"tile ({qb}, {kb})"


# ----------------------------------------------------------------------------------------------
# fascore.plan.rectangles (the fused backward's cover)
# ----------------------------------------------------------------------------------------------
def _check_rectangles(mask: MaskSpec, b: int, n: int, bq: int, bk: int) -> None:
    want = truth(mask, b, n)
    allowed_any = want.any(1).any(0)  # [sq, skv]: takes part for some (b, n)
    count = torch.zeros(mask.sq, mask.skv, dtype=torch.int64)
    rects = list(rectangles(mask, bq, bk))
    for i0, i1, j0, j1, how in rects:
        assert how in ("full", "causal", "masked"), how
        assert 0 <= i0 < i1 <= mask.sq and 0 <= j0 < j1 <= mask.skv, (i0, i1, j0, j1, how)
        count[i0:i1, j0:j1] += 1
        t = want[:, :, i0:i1, j0:j1]
        if how == "full":
            assert t.all(), f"'full' rectangle {(i0, i1, j0, j1)} has masked positions"
        elif how == "causal":
            i = torch.arange(i1 - i0).view(-1, 1)
            j = torch.arange(j1 - j0).view(1, -1)
            causal = (j <= i).expand_as(t)
            assert torch.equal(t, causal), f"'causal' rectangle {(i0, i1, j0, j1)} is not top-left causal"
    assert (count[allowed_any] == 1).all(), (
        f"allowed positions covered {count[allowed_any].unique().tolist()} times; rectangles {rects}")


@PROPS
@given(mask_cases(), tile_sizes)
def test_rectangles_cover_exactly_the_allowed_positions(case, tiles):
    mask, b, n = case
    _check_rectangles(mask, b, n, *tiles)


@PROPS
@given(st.integers(1, 80), st.integers(1, 80), band_end, band_end, tile_sizes,
       st.one_of(st.none(), st.integers(0, 83)))
def test_rectangles_analytic_bands(sq, skv, lo, hi, tiles, prefix):
    """Pure bands (the causal/band sparse modes, incl. the analytic upper-band shortcut), with an
    optional prefix (modes 5/6)."""
    lo = -UNBOUNDED if lo is None else lo
    hi = UNBOUNDED if hi is None else hi
    mask = MaskSpec(sq, skv, lo, hi, prefix=None if prefix is None else (prefix,))
    _check_rectangles(mask, 1, 1, *tiles)


@pytest.mark.parametrize("sq, skv", [(1, 1), (7, 29), (29, 7), (33, 33), (64, 48)])
@pytest.mark.parametrize("hi_shift", [-40, -5, -1, 0, 1, 5, 40])
def test_rectangles_causal_modes(sq, skv, hi_shift):
    """Modes 2/3 (j - i <= hi only) go through the analytic shortcut: at most two rectangles."""
    mask = MaskSpec(sq, skv, hi=hi_shift)
    rects = list(rectangles(mask, 16, 16))
    assert len(rects) <= 2
    _check_rectangles(mask, 1, 1, 16, 16)


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------
def _layout_tensor(layout: str, b: int, n: int, s: int, d: int, g: torch.Generator) -> torch.Tensor:
    shape = {"BSH": (b, s, n * d), "SBH": (s, b, n * d), "BSND": (b, s, n, d), "BNSD": (b, n, s, d)}[layout]
    return torch.randn(*shape, generator=g)


def _element(x: torch.Tensor, layout: str, d: int, bb: int, nn: int, ss: int, dd: int) -> float:
    """SPEC §2: x's element (b, n, s, d); the hidden index is n*D + d."""
    if layout == "BSH":
        return x[bb, ss, nn * d + dd]
    if layout == "SBH":
        return x[ss, bb, nn * d + dd]
    if layout == "BSND":
        return x[bb, ss, nn, dd]
    return x[bb, nn, ss, dd]


@LAYOUT_PROPS
@given(st.sampled_from(["BSH", "SBH", "BSND", "BNSD"]), st.integers(1, 3), st.integers(1, 4),
       st.integers(1, 9), st.integers(1, 6), st.integers(0, 1000))
def test_to_from_bnsd_round_trip(layout, b, n, s, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = _layout_tensor(layout, b, n, s, d, g)
    y = to_bnsd(x, layout, n)
    assert y.shape == (b, n, s, d)
    assert y.data_ptr() == x.data_ptr(), "to_bnsd must be a view"
    for bb, nn, ss, dd in [(0, 0, 0, 0), (b - 1, n - 1, s - 1, d - 1), (b // 2, n // 2, s // 2, d // 2)]:
        assert y[bb, nn, ss, dd] == _element(x, layout, d, bb, nn, ss, dd)
    # every element, through an index tensor
    idx = torch.arange(x.numel(), dtype=torch.float64).view(x.shape)
    yi = to_bnsd(idx, layout, n)
    for bb in range(b):
        for nn in range(n):
            for ss in range(s):
                for dd in range(d):
                    assert yi[bb, nn, ss, dd] == _element(idx, layout, d, bb, nn, ss, dd)
    back = from_bnsd(y, layout)
    assert back.is_contiguous()
    assert torch.equal(back, x)
    # and from a contiguous [B, N, S, D] tensor the other way round
    z = torch.randn(b, n, s, d, generator=g)
    assert torch.equal(to_bnsd(from_bnsd(z, layout), layout, n), z)


@st.composite
def tnd_cases(draw):
    nb = draw(st.integers(1, 5))
    lq = draw(st.lists(st.integers(0, 7), min_size=nb, max_size=nb))
    lk = draw(st.lists(st.integers(0, 7), min_size=nb, max_size=nb))
    pad = draw(st.integers(0, 3))
    n1 = draw(st.integers(1, 4))
    return lq, lk, pad, n1


def _cum(lengths):
    out, acc = [], 0
    for x in lengths:
        acc += x
        out.append(acc)
    return out


@LAYOUT_PROPS
@given(tnd_cases())
def test_tnd_batches_and_rows(case):
    lq, lk, pad, n1 = case
    batches = tnd_batches(_cum(lq), _cum(lk))
    assert [x.index for x in batches] == list(range(len(lq)))
    assert [x.sq for x in batches] == lq and [x.skv for x in batches] == lk
    assert [x.q0 for x in batches] == [0] + _cum(lq)[:-1]
    assert [x.k0 for x in batches] == [0] + _cum(lk)[:-1]
    t1 = sum(lq) + pad
    x = torch.randn(t1, n1, 3)
    for bt in batches:
        r = tnd_rows(x, bt.q0, bt.sq)
        assert r.shape == (1, n1, bt.sq, 3)
        for i in range(bt.sq):
            assert torch.equal(r[0, :, i], x[bt.q0 + i])


@LAYOUT_PROPS
@given(tnd_cases(), st.sampled_from(["", "TND"]))
def test_tnd_stats_views(case, softmax_layout):
    """SPEC §2: "" = per batch a contiguous [N1, Sq_b, 8] block at element offset N1*8*sum(Sq_<b);
    "TND" = plain row-major [T1, N1, 8]. The views write through to the buffer."""
    lq, lk, pad, n1 = case
    batches = tnd_batches(_cum(lq), _cum(lk))
    t1 = sum(lq) + pad
    buf = torch.zeros(t1, n1, 8)
    flat = buf.view(-1)
    owner = torch.full((t1 * n1 * 8,), -1, dtype=torch.int64)
    for bt in batches:
        v = tnd_stats_view(buf, bt, n1, softmax_layout)
        assert v.shape == (n1, bt.sq, 8)
        if bt.sq == 0:
            continue
        vals = torch.arange(v.numel(), dtype=torch.float32).view(v.shape) + 1000 * (bt.index + 1)
        v[...] = vals
        for nn in range(n1):
            for i in range(bt.sq):
                if softmax_layout == "TND":
                    assert torch.equal(buf[bt.q0 + i, nn], vals[nn, i])
                    pos = ((bt.q0 + i) * n1 + nn) * 8
                else:
                    pos = n1 * 8 * bt.q0 + (nn * bt.sq + i) * 8
                    assert torch.equal(flat[pos:pos + 8], vals[nn, i])
                assert (owner[pos:pos + 8] == -1).all(), "two batches share statistics memory"
                owner[pos:pos + 8] = bt.index
    # together the batches own exactly the first N1*8*sum(Sq) elements ("" layout) or the
    # rows [0, sum(Sq)) ("TND" layout): the same set, and nothing beyond it is written
    used = n1 * 8 * sum(lq)
    assert (owner[:used] >= 0).all()
    assert (owner[used:] == -1).all()
    assert (flat[used:] == 0).all()


@LAYOUT_PROPS
@given(tnd_cases())
def test_tnd_stats_layouts_agree_per_batch(case):
    """The same per-batch values written through both layouts give the same [N1, Sq_b, 8] views."""
    lq, lk, pad, n1 = case
    batches = tnd_batches(_cum(lq), _cum(lk))
    t1 = sum(lq) + pad
    a, b = torch.zeros(t1, n1, 8), torch.zeros(t1, n1, 8)
    for bt in batches:
        vals = torch.randn(n1, bt.sq, 1).expand(n1, bt.sq, 8)
        tnd_stats_view(a, bt, n1, "")[...] = vals
        tnd_stats_view(b, bt, n1, "TND")[...] = vals
    for bt in batches:
        assert torch.equal(tnd_stats_view(a, bt, n1, ""), tnd_stats_view(b, bt, n1, "TND"))
    # single batch: both layouts are the same memory order only when N1 == 1 or Sq <= 1
    if len(batches) == 1 and (n1 == 1 or lq[0] <= 1):
        assert torch.equal(a, b)


def test_layouts_constant():
    assert LAYOUTS == ("BSH", "SBH", "BSND", "BNSD", "TND")
    assert Batch(0, 0, 1, 0, 1).sq == 1
