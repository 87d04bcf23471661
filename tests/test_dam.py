"""DAM hard-negative sampling and the matching loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from torch import nn

from gram.losses import dam_loss, sample_hard_negatives
from gram.losses.dam import negative_sampling_probs


@pytest.fixture
def single_thread():
    """Thousands of tiny draws: intra-op threads only add overhead (and thrash on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def expected_probs(logits: torch.Tensor, offset: int, eps: float = 1e-4) -> torch.Tensor:
    """Reference §2.8: softmax + eps, the positive zeroed, renormalised per row (B, N), float64."""
    probs = torch.softmax(logits.double(), dim=1) + eps
    for i in range(logits.shape[0]):
        probs[i, offset + i] = 0.0
    return probs / probs.sum(1, keepdim=True)


def test_never_samples_the_positive_even_when_it_dominates(single_thread: None) -> None:
    batch, total, offset = 5, 9, 3
    logits = torch.full((batch, total), -50.0)
    logits[torch.arange(batch), offset + torch.arange(batch)] = 50.0  # all mass on the positives
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        neg_data, neg_anchor = sample_hard_negatives(logits, logits.clone(), offset, generator=gen)
        positives = offset + torch.arange(batch)
        assert neg_data.shape == neg_anchor.shape == (batch,)
        assert (neg_data != positives).all() and (neg_anchor != positives).all()
        assert ((neg_data >= 0) & (neg_data < total)).all()


@pytest.mark.parametrize(("total", "scale", "draws"), [(6, 1.5, 2000), (70, 1.0, 4000)])
@pytest.mark.slow
def test_samples_follow_the_softmax_distribution(
    single_thread: None, total: int, scale: float, draws: int
) -> None:
    """Chi-square goodness of fit per row on a fixed seed (and the test rejects uniform sampling).

    70 columns span several blocks of the two-level search, 6 fit in one.
    """
    batch, offset = 3, 2
    gen = torch.Generator().manual_seed(1)
    logits = scale * torch.randn(batch, total, generator=gen)
    counts = torch.zeros(2, batch, total)
    for _ in range(draws):
        neg_data, neg_anchor = sample_hard_negatives(logits, logits.flip(1), offset, generator=gen)
        counts[0, torch.arange(batch), neg_data] += 1
        counts[1, torch.arange(batch), neg_anchor] += 1
    for direction, source in enumerate((logits, logits.flip(1))):
        probs = expected_probs(source, offset)
        for i in range(batch):
            keep = probs[i] > 0
            observed = counts[direction, i][keep].numpy()
            assert chisquare(observed, probs[i][keep].numpy() * draws).pvalue > 1e-3
            uniform = torch.full((int(keep.sum()),), draws / float(keep.sum())).numpy()
            assert chisquare(observed, uniform).pvalue < 1e-6


def test_non_finite_rows_draw_valid_negatives_and_leave_other_rows_alone() -> None:
    # A NaN clip or a diverged step gives NaN/inf logits; the inverse-CDF search used to index past the end.
    clean = torch.randn(6, 70, generator=torch.Generator().manual_seed(0))
    broken = clean.clone()
    broken[1, 5] = float("nan")
    broken[2, 40] = float("inf")
    broken[3] = float("-inf")
    broken[4] = float("nan")
    offset = 64  # positives at columns 64..69, in the last (partial) block of 32
    for _ in range(50):
        seed = int(torch.randint(1 << 30, (1,)))
        drawn, _ = sample_hard_negatives(broken, broken, offset, torch.Generator().manual_seed(seed))
        reference, _ = sample_hard_negatives(clean, clean, offset, torch.Generator().manual_seed(seed))
        assert ((drawn >= 0) & (drawn < 70)).all()
        assert (drawn != torch.arange(6) + offset).all()  # never the positive
        assert drawn[[0, 5]].tolist() == reference[[0, 5]].tolist()  # finite rows: the same draw as before


def test_sampling_weights_match_reference_formula() -> None:
    logits = torch.randn(4, 10)
    probs = negative_sampling_probs(logits, offset=6)
    normalised = probs.double() / probs.double().sum(1, keepdim=True)
    torch.testing.assert_close(normalised, expected_probs(logits, 6))


@pytest.mark.parametrize(("shape", "offset"), [((3, 1), 0), ((3, 5), 3), ((2, 4), -1)])
def test_bad_sampling_inputs_raise(shape: tuple[int, int], offset: int) -> None:
    with pytest.raises(ValueError, match="offset"):
        sample_hard_negatives(torch.zeros(shape), torch.zeros(shape), offset)


class TinyMatcher(nn.Module):
    """Token embedding mean + pooled condition -> 2 logits; records its inputs."""

    def __init__(self, vocab: int = 50, hidden: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(2 * hidden, 2)
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.seen.append((ids, mask, cond))
        text = (self.embed(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (3B, H)
        return self.head(torch.cat([text, cond.mean(1)], dim=-1))  # (3B, 2H) -> (3B, 2)


def _dam_batch(batch: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (batch, 5), generator=gen)
    mask = torch.ones(batch, 5, dtype=torch.long)
    mask[:, 4] = 0
    data_encoder = nn.Linear(3, 8)
    condition = data_encoder(torch.randn(batch, 6, 3, generator=gen))  # (B, Lc, H)
    logits = torch.randn(batch, batch, generator=gen)
    return ids, mask, condition, data_encoder, logits


def test_dam_builds_the_three_pair_groups_and_plain_ce() -> None:
    ids, mask, condition, _, logits = _dam_batch()
    matcher = TinyMatcher()
    loss = dam_loss(
        matcher, ids, mask, condition, logits, logits.T, generator=torch.Generator().manual_seed(3)
    )
    neg_data, neg_text = sample_hard_negatives(
        logits, logits.T, 0, generator=torch.Generator().manual_seed(3)
    )
    seen_ids, seen_mask, seen_cond = matcher.seen[0]
    assert torch.equal(seen_ids, torch.cat([ids, ids, ids[neg_text]]))
    assert torch.equal(seen_mask, torch.cat([mask, mask, mask[neg_text]]))
    assert torch.equal(seen_cond, torch.cat([condition, condition[neg_data], condition]))
    labels = torch.tensor([1] * 4 + [0] * 8)
    with torch.no_grad():
        expected = F.cross_entropy(matcher(seen_ids, seen_mask, seen_cond), labels)
    torch.testing.assert_close(loss.detach(), expected)


def test_dam_gradients_reach_matcher_and_data_encoder_only() -> None:
    ids, mask, condition, data_encoder, logits = _dam_batch()
    logits = logits.requires_grad_()
    matcher = TinyMatcher()
    dam_loss(
        matcher, ids, mask, condition, logits, logits.T, generator=torch.Generator().manual_seed(0)
    ).backward()
    for module in (matcher.embed, matcher.head, data_encoder):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert logits.grad is None  # negatives are sampled without gradient


def test_dam_rejects_wrong_match_fn_output() -> None:
    ids, mask, condition, _, logits = _dam_batch()
    with pytest.raises(ValueError, match="match_fn"):
        dam_loss(lambda i, m, c: torch.zeros(3 * 4, 3), ids, mask, condition, logits, logits.T)


def test_dam_rejects_mismatched_inputs() -> None:
    ids, mask, condition, _, logits = _dam_batch()
    with pytest.raises(ValueError, match="text_mask"):
        dam_loss(TinyMatcher(), ids, mask[:, :3], condition, logits, logits.T)
    with pytest.raises(ValueError, match="condition"):
        dam_loss(TinyMatcher(), ids, mask, condition[:2], logits, logits.T)


def test_dam_gradients_are_identical_when_a_data_item_is_drawn_many_times() -> None:
    # Every text draws item 0 as its negative, so its condition gradient sums many contributions; advanced
    # indexing's CPU backward added them atomically, in a different order from run to run.
    batch, tokens, hidden = 16, 1024, 8
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (batch, 5), generator=gen)
    mask = torch.ones(batch, 5, dtype=torch.long)
    condition = torch.randn(batch, tokens, hidden, generator=gen, requires_grad=True)
    logits = torch.full((batch, batch), -30.0)
    logits[:, 0] = 30.0  # (B, B): item 0 is the hardest negative of every other row
    matcher = TinyMatcher(hidden=hidden)
    grads = set()
    for _ in range(20):
        condition.grad = None
        dam_loss(
            matcher, ids, mask, condition, logits, logits.T, generator=torch.Generator().manual_seed(1)
        ).backward()
        grads.add(condition.grad.numpy().tobytes())
    assert len(grads) == 1
