"""The eager reference ops against hand-computed cases, an independent literal
implementation of docs/algorithm.md, "Matching", and the properties every slot map must have."""
import math

import pytest
import torch

import mctf_kernels as mk


def _on_circle(degrees):
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=-1)[None].float()


# tokens 0..6: A = 0, 2, 4, 6 and B = 1, 3, 5 (see the derivations in each test)
ANGLES = [0.0, 0.0, 10.0, 90.0, 95.0, 180.0, 150.0]


def _sim_only(x, r, **kw):
    return mk.match_reference(x, r, None, None, tau_sim=1, tau_info=0, tau_size=0, **kw)


def test_bidirectional_by_hand():
    # stage 1 (r1=1): best A is token 4 (5 deg from B token 3) -> merged into token 3.
    # unmerged A sorted by index: 0, 2, 6 -> slots 0, 1, 2.
    # stage 2 (r2=1): B token 1 best matches token 2 (10 deg, score .992), B token 5 matches
    # token 6 (.933), B token 3 matches token 6 (.75): token 1 merges into slot 1; tokens 5, 3
    # stay in descending-score order -> slots 3, 4; token 4 follows token 3.
    dest = _sim_only(_on_circle(ANGLES), 2, num_protected=1, bidirectional=True)
    assert dest.tolist() == [[0, 1, 1, 4, 4, 3, 2]]


def test_unidirectional_by_hand():
    # r1 = 2: tokens 4 -> 3 and 2 -> 1; unmerged A 0, 6 -> slots 0, 1; B 1, 3, 5 -> 2, 3, 4
    dest = _sim_only(_on_circle(ANGLES), 2, num_protected=1, bidirectional=False)
    assert dest.tolist() == [[0, 2, 2, 3, 3, 4, 1]]


def test_no_protected_tokens_keep_score_order():
    # token 0 at 200 deg now competes (best: token 5, score .970). Ranking A: 4, 2, 0, 6.
    # r=1 unidirectional: 4 -> 3. Unmerged A stay in descending score order: 2, 0, 6.
    angles = [200.0] + ANGLES[1:]
    dest = _sim_only(_on_circle(angles), 1, num_protected=0, bidirectional=False)
    assert dest.tolist() == [[1, 3, 0, 4, 4, 5, 2]]


def test_scores_match_the_formula_elementwise():
    torch.manual_seed(1)
    B, T, C = 2, 9, 5
    x = torch.randn(B, T, C)
    attn = torch.rand(B, T) + 0.01
    size = torch.randint(1, 5, (B, T)).float()
    tau = dict(tau_sim=2.0, tau_info=20.0, tau_size=40.0)
    got = mk.scores_reference(x, attn, size, num_protected=1, **tau)
    xd = x.double()
    info = (1 / attn.double()) / (1 / attn.double()).max(dim=1, keepdim=True).values
    zs = (1 / size.double()) / (1 / size.double()).max(dim=1, keepdim=True).values
    for b in range(B):
        for i, a in enumerate(range(0, T, 2)):
            for j, k in enumerate(range(1, T, 2)):
                cos = (xd[b, a] @ xd[b, k]) / (xd[b, a].norm() * xd[b, k].norm())
                want = ((cos + 1) / 2) ** 0.5 * (info[b, a] * info[b, k]) ** (1 / 20) * (zs[b, a] * zs[b, k]) ** (1 / 40)
                if a == 0:
                    assert got[b, i, j] == float("-inf")
                else:
                    assert got[b, i, j].item() == pytest.approx(want.item(), rel=1e-5)


def test_zero_temperatures_switch_criteria_off():
    x = torch.randn(1, 9, 4)
    s = mk.scores_reference(x, torch.rand(1, 9), torch.ones(1, 9), tau_sim=0, tau_info=0, tau_size=0, num_protected=0)
    assert torch.equal(s, torch.ones(1, 5, 4))


def test_zero_token_is_not_nan():
    x = torch.randn(1, 9, 4)
    x[0, 3] = 0
    s = mk.scores_reference(x, None, None, num_protected=1)
    assert not torch.isnan(s).any()
    dest = mk.match_reference(x, 3, None, None, num_protected=1)
    assert dest.shape == (1, 9)


# ---------------------------------------------------------------------------
# an independent, literal implementation of docs/algorithm.md, "Matching" (lists, sorted())


def literal_slot_map(score, r, num_protected, bidirectional):
    t1, t2 = len(score), len(score[0])
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    argmax = lambda vals: max(range(len(vals)), key=lambda i: (vals[i], -i))  # first max
    node_max = [max(row) for row in score]
    node_idx = [argmax(row) for row in score]
    ranked = sorted(range(t1), key=lambda a: -node_max[a])  # sorted() is stable
    src, unm = ranked[:r1], ranked[r1:]
    if num_protected:
        unm = sorted(unm)
    groups_b = {b: [2 * b + 1] for b in range(t2)}
    for a in src:
        groups_b[node_idx[a]].append(2 * a)
    out = [[2 * a] for a in unm]
    if bidirectional:
        col = [[score[u][b] for u in unm] for b in range(t2)]
        m2 = [max(c) for c in col]
        i2 = [argmax(c) for c in col]
        ranked_b = sorted(range(t2), key=lambda b: -m2[b])
        for b in ranked_b[:r2]:
            out[i2[b]] += groups_b[b]
        out += [groups_b[b] for b in ranked_b[r2:]]
    else:
        out += [groups_b[b] for b in range(t2)]
    if num_protected > 1:  # protected tokens first, in order
        prefix = [g for g in out if min(g) < num_protected]
        out = sorted(prefix, key=min) + [g for g in out if min(g) >= num_protected]
    dest = [0] * (t1 + t2)
    for slot, group in enumerate(out):
        for t in group:
            dest[t] = slot
    return dest


CASES = [
    # T, r, num_protected, bidirectional
    (7, 1, 1, True), (8, 3, 1, True), (11, 5, 1, True), (11, 5, 1, False), (10, 4, 0, True),
    (10, 4, 0, False), (12, 5, 2, True), (13, 5, 2, False), (197, 16, 1, True), (197, 98, 1, True),
    (197, 98, 0, True), (198, 48, 2, True), (201, 60, 5, True), (9, 3, 3, False),
]


@pytest.mark.parametrize("T,r,num_protected,bidirectional", CASES)
def test_matches_literal_spec(T, r, num_protected, bidirectional):
    torch.manual_seed(T * 1000 + r)
    B, C = 3, 16
    x = torch.randn(B, T, C)
    attn = torch.softmax(torch.randn(B, 2, T, T) * 3, dim=-1).mean(dim=(1, 2))
    size = torch.randint(1, 6, (B, T)).float()
    dest = mk.match_reference(x, r, attn, size, num_protected=num_protected, bidirectional=bidirectional)
    scores = mk.scores_reference(x, attn, size, num_protected=num_protected)
    for b in range(B):
        assert dest[b].tolist() == literal_slot_map(scores[b].tolist(), r, num_protected, bidirectional)


@pytest.mark.parametrize("T,r,num_protected,bidirectional", CASES)
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_merge_properties(T, r, num_protected, bidirectional, mode):
    torch.manual_seed(T + r + mode)
    B, C = 3, 8
    x = torch.randn(B, T, C)
    attn = torch.rand(B, T) + 0.05
    size = torch.randint(1, 4, (B, T)).float()
    dest = mk.match_reference(x, r, attn, size, num_protected=num_protected, bidirectional=bidirectional)
    t_out = T - r
    # every slot is used, prefix tokens alone and first
    assert dest.min() == 0 and dest.max() == t_out - 1
    for b in range(B):
        assert len(set(dest[b].tolist())) == t_out
        assert dest[b, :num_protected].tolist() == list(range(num_protected))
        assert (dest[b] < num_protected).sum() == num_protected
    src = torch.eye(T).expand(B, T, T)
    out, new_size, new_src = mk.merge_reference(x, dest, t_out, size, attn, mode=mode, source=src)
    assert out.shape == (B, t_out, C)
    assert torch.equal(new_size.sum(1), size.sum(1))
    # source rows partition the original tokens
    assert torch.equal(new_src.sum(1), torch.ones(B, T))
    assert torch.equal(new_src.sum(2), torch.stack([torch.bincount(d, minlength=t_out) for d in dest]).float())
    torch.testing.assert_close(out[:, :num_protected], x[:, :num_protected])
    # each slot against a direct computation
    w = {0: size, 1: attn * size / size.amax(1, keepdim=True), 3: torch.ones_like(size)}.get(mode)
    for b in range(B):
        for o in range(t_out):
            members = (dest[b] == o).nonzero()[:, 0]
            if mode == 2:
                want = x[b, members].max(0).values.double()
            else:
                ww = w[b, members, None].double()
                want = (x[b, members].double() * ww).sum(0) / ww.sum()
            torch.testing.assert_close(out[b, o].double(), want, rtol=1e-5, atol=1e-6)


def test_r_zero_is_identity():
    x = torch.randn(2, 11, 6)
    dest = mk.match_reference(x, 0, None, None)
    assert torch.equal(dest, torch.arange(11).expand(2, 11))
    out, size, _ = mk.merge_reference(x, dest, 11, None, None, mode=0)
    assert torch.equal(out, x) and torch.equal(size, torch.ones(2, 11))


def test_merge_keeps_dtype_and_gradients():
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    size = torch.rand(2, 9, dtype=torch.float64) + 1
    attn = torch.rand(2, 9, dtype=torch.float64) + 0.1
    dest = mk.match_reference(x.detach(), 3, attn, size)
    torch.autograd.gradcheck(lambda t: mk.merge_reference(t, dest, 6, size, attn, mode=1)[0], (x,))
    out, _, _ = mk.merge_reference(x.half(), dest, 6, size, attn, mode=1)
    assert out.dtype == torch.float16


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_fused_attention_equals_merged_attention_times_values(mode):
    torch.manual_seed(mode)
    B, H, T, D, r = 2, 3, 13, 4, 5
    attn = torch.softmax(torch.randn(B, H, T, T, dtype=torch.float64) * 2, dim=-1)
    received = mk.attention_received_reference(attn)
    size = torch.randint(1, 4, (B, T)).double()
    x = torch.randn(B, T, 8, dtype=torch.float64)
    dest = mk.match_reference(x, r, received, size)
    v = torch.randn(B, H, T - r, D, dtype=torch.float64)
    p_merged = mk.merged_attention_reference(attn, dest, T - r, size, received, mode=mode)
    got = mk.fused_attention_output_reference(attn, v, dest, T - r, size, received, mode=mode)
    torch.testing.assert_close(got, p_merged @ v)
    # columns are summed: weighted modes keep rows summing to one
    if mode != 2:
        torch.testing.assert_close(p_merged.sum(-1), torch.ones(B, H, T - r, dtype=torch.float64))


def test_attention_received_is_mean_over_heads_and_queries():
    attn = torch.softmax(torch.randn(2, 3, 7, 7), -1)
    torch.testing.assert_close(mk.attention_received_reference(attn), attn.sum((1, 2)) / 21)


@pytest.mark.parametrize("T,r,n_p,want", [
    (197, 16, 1, 16), (197, 0.35, 1, 68), (197, 200, 1, 98), (15, 8, 1, 5), (11, 0.35, 1, 3),
    (10, 0.35, 1, 0), (12, 16, 1, 2), (21, 16, 1, 10), (198, 16, 2, 16), (5, 3, 1, 0), (197, 0, 1, 0),
])
def test_tokens_to_remove(T, r, n_p, want):
    assert mk.tokens_to_remove(T, r, n_p) == want


# ---------------------------------------------------------------------------
# clear errors


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 9, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        mk.match(torch.randn(9, 4), 2)
    with pytest.raises(ValueError, match="r must be in"):
        mk.match(x, 5)
    with pytest.raises(ValueError, match="r must be in"):
        mk.match(x, -1)
    with pytest.raises(TypeError, match="r must be an int"):
        mk.match(x, 0.5)
    with pytest.raises(ValueError, match="attn_received must have shape"):
        mk.match(x, 2, torch.rand(2, 8))
    with pytest.raises(ValueError, match="tau_info"):
        mk.match(x, 2, tau_info=-1)
    with pytest.raises(ValueError, match="r must be >= 0"):
        mk.tokens_to_remove(197, -3)
    dest = mk.match(x, 2)
    with pytest.raises(ValueError, match="pooling mode"):
        mk.merge(x, dest, 7, mode=4)
    with pytest.raises(ValueError, match="t_out"):
        mk.merge(x, dest, 12, mode=0)
    with pytest.raises(ValueError, match="needs attn_received"):
        mk.merge(x, dest, 7, mode=1)
    with pytest.raises(ValueError, match="attn must"):
        mk.attention_received(torch.rand(2, 9, 9))
