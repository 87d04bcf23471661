"""ContrastiveLoss, LossConfig and the baseline similarities against independent formulas."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import gram.losses.contrastive as contrastive
from gram.losses import ContrastiveLoss, LossConfig, build_loss, list_similarities

DATA = ["vision", "audio"]


def embeddings(
    batch: int = 6, dim: int = 16, seed: int = 0, names=("text", *DATA)
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        n: F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1) for n in names
    }


def leaves(emb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.clone().requires_grad_() for n, t in emb.items()}


def det_volume(anchor: torch.Tensor, *data: torch.Tensor) -> torch.Tensor:
    """sqrt|det G| with an explicit (N1, N2, k, k) Gram tensor (the reference formulation)."""
    vectors = [anchor[:, None].expand(-1, data[0].shape[0], -1)]
    vectors += [x[None].expand(anchor.shape[0], -1, -1) for x in data]
    stacked = torch.stack(vectors, dim=2)  # (N1, N2, k, d)
    gram = stacked @ stacked.transpose(-1, -2)  # (N1, N2, k, k)
    return torch.linalg.det(gram).abs().sqrt()


def two_way(scores_a2d: torch.Tensor, scores_d2a: torch.Tensor, tau: float, smoothing: float = 0.1):
    """1/2 [CE(a2d / tau) + CE(d2a / tau)] with arange targets, both (B, B)."""
    targets = torch.arange(scores_a2d.shape[0])
    ce = [F.cross_entropy(s / tau, targets, label_smoothing=smoothing) for s in (scores_a2d, scores_d2a)]
    return 0.5 * (ce[0] + ce[1])


def reference_volume_loss(emb: dict[str, torch.Tensor], detach_other_side: bool, tau: float = 0.07):
    """Reference §2.7 on one rank: M1 = -Vol(t, V, A)/tau, M2 = -Vol(T, v, a).T/tau."""
    t, v, a = emb["text"], emb["vision"], emb["audio"]
    if detach_other_side:
        m1 = -det_volume(t, v.detach(), a.detach())
        m2 = -det_volume(t.detach(), v, a).T
    else:
        m1 = -det_volume(t, v, a)
        m2 = m1.T
    return two_way(m1, m2, tau)


def grads(loss: torch.Tensor, emb: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(emb.values())))


@pytest.mark.parametrize("gather_with_grad", [False, True])
def test_volume_loss_matches_reference_formula_and_gradients(gather_with_grad: bool) -> None:
    base = embeddings()
    ours_in, ref_in = leaves(base), leaves(base)
    loss_fn = build_loss(LossConfig(gather_with_grad=gather_with_grad))
    out = loss_fn(ours_in, DATA)
    ref = reference_volume_loss(ref_in, detach_other_side=not gather_with_grad)
    torch.testing.assert_close(out["loss"].double(), ref.double(), rtol=1e-5, atol=1e-6)
    for ours_grad, ref_grad in zip(grads(out["loss"], ours_in), grads(ref, ref_in)):
        torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-5, atol=1e-7)
    vol = det_volume(base["text"], base["vision"], base["audio"])
    torch.testing.assert_close(out["logits_anchor_to_data"], -vol / 0.07, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["logits_data_to_anchor"], -vol.T / 0.07, rtol=1e-5, atol=1e-5)
    assert not out["logits_anchor_to_data"].requires_grad and not out["temperature"].requires_grad
    assert torch.equal(out["targets"], torch.arange(6))


def test_detached_and_with_grad_gradients_differ() -> None:
    """The reference detaches the other side; with_grad must really change the text gradient."""
    base = embeddings()
    text_grads = []
    for flag in (False, True):
        emb = leaves(base)
        build_loss(LossConfig(gather_with_grad=flag))(emb, DATA)["loss"].backward()
        text_grads.append(emb["text"].grad)
    assert not torch.allclose(text_grads[0], text_grads[1])


def _four_modalities() -> dict[str, torch.Tensor]:
    return leaves(embeddings(batch=5, names=("text", "vision", "audio", "subtitle")))


def test_cosine_baseline_is_sum_of_pairwise_infonce() -> None:
    emb = _four_modalities()
    out = build_loss(LossConfig(name="cosine", gather_with_grad=True))(emb, ["vision", "audio", "subtitle"])
    t = emb["text"]
    expected = sum(two_way(t @ emb[m].T, (t @ emb[m].T).T, 0.07) for m in ("vision", "audio", "subtitle"))
    torch.testing.assert_close(out["loss"].double(), expected.double(), rtol=1e-5, atol=1e-6)


def test_symile_baseline_is_multilinear_inner_product() -> None:
    emb = _four_modalities()
    out = build_loss(LossConfig(name="symile", gather_with_grad=True))(emb, ["vision", "audio", "subtitle"])
    mip = torch.einsum("id,jd,jd,jd->ij", emb["text"], emb["vision"], emb["audio"], emb["subtitle"])
    torch.testing.assert_close(out["loss"].double(), two_way(mip, mip.T, 0.07).double(), rtol=1e-5, atol=1e-6)


def test_triangle_baseline_is_triangle_area() -> None:
    emb = leaves(embeddings())
    out = build_loss(LossConfig(name="triangle", gather_with_grad=True))(emb, DATA)
    u = emb["text"][:, None] - emb["vision"][None]  # (B, B, d)
    w = emb["text"][:, None] - emb["audio"][None]  # (B, B, d)
    area = 0.5 * (u.square().sum(-1) * w.square().sum(-1) - (u * w).sum(-1) ** 2).sqrt()  # (B, B)
    torch.testing.assert_close(
        out["loss"].double(), two_way(-area, -area.T, 0.07).double(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", ["volume", "cosine", "symile", "triangle"])
@pytest.mark.parametrize("gather_with_grad", [False, True])
def test_chunked_equals_unchunked(name: str, gather_with_grad: bool) -> None:
    base = embeddings(batch=7)
    results = []
    for chunk in (0, 3):
        emb = leaves(base)
        loss_fn = build_loss(LossConfig(name=name, chunk_size=chunk, gather_with_grad=gather_with_grad))
        out = loss_fn(emb, DATA)
        results.append((out["loss"], out["logits_anchor_to_data"], grads(out["loss"], emb)))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    for g0, g1 in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(g0, g1)


def test_temperature_parametrisations() -> None:
    emb = leaves(embeddings())
    raw = build_loss(LossConfig(temperature_parametrization="raw", temperature_init=0.05))
    assert raw.temperature_param.item() == pytest.approx(0.05)
    raw(emb, DATA)["loss"].backward()
    assert raw.temperature_param.grad is not None and raw.temperature_param.grad != 0
    log = build_loss(LossConfig(temperature_init=0.05))
    assert log.temperature_param.item() == pytest.approx(math.log(0.05))
    log(emb, DATA)["loss"].backward()
    assert log.temperature_param.grad != 0
    with torch.no_grad():
        log.temperature_param.fill_(math.log(1e-4))  # below temperature_min = 0.01
    assert log(emb, DATA)["temperature"].item() == pytest.approx(0.01)
    assert log.temperature_param.item() == pytest.approx(math.log(0.01))  # clamped in place


def test_fixed_temperature_is_a_buffer() -> None:
    loss_fn = build_loss(LossConfig(learnable_temperature=False, temperature_init=0.1))
    assert list(loss_fn.parameters()) == []
    assert loss_fn(leaves(embeddings()), DATA)["temperature"].item() == pytest.approx(0.1)


def test_label_smoothing_is_applied() -> None:
    base = embeddings()
    plain = build_loss(LossConfig(label_smoothing=0.0, gather_with_grad=True))(base, DATA)["loss"]
    vol = det_volume(base["text"], base["vision"], base["audio"])
    torch.testing.assert_close(
        plain.double(), two_way(-vol, -vol.T, 0.07, 0.0).double(), rtol=1e-5, atol=1e-6
    )


def test_bf16_autocast_gives_finite_float32_outputs() -> None:
    emb = {n: t.float().bfloat16().requires_grad_() for n, t in embeddings(batch=8, dim=32).items()}
    loss_fn = build_loss(LossConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(emb, DATA)
    out["loss"].backward()
    assert out["logits_anchor_to_data"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert all(torch.isfinite(t.grad).all() for t in emb.values())


def _fake_two_rank_world(monkeypatch: pytest.MonkeyPatch, full: dict[str, torch.Tensor], rows: slice) -> None:
    """Pretend to be the rank that holds ``rows`` of ``full``; the other rank holds the rest."""
    sizes = [rows.start, full["text"].shape[0] - rows.start]
    rank = 1

    def fake_gather(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
        """Rank 0's rows of the matching modality, then the local rows."""
        source = next(t for t in full.values() if torch.equal(t[rows], x.detach()))
        gathered = torch.cat([source[: rows.start], x])  # (5, d)
        return gathered if with_grad else gathered.detach()

    monkeypatch.setattr(contrastive, "all_gather", fake_gather)
    monkeypatch.setattr(contrastive, "gather_sizes", lambda n, device=None: sizes)
    monkeypatch.setattr(contrastive, "get_world_size", lambda: 2)
    monkeypatch.setattr(contrastive, "rank_offset", lambda s: sum(s[:rank]))


def test_targets_for_second_rank_with_uneven_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 holds the last 2 of 5 samples: its rows' positives are global columns 3 and 4."""
    full = embeddings(batch=5)
    rows = slice(3, 5)
    _fake_two_rank_world(monkeypatch, full, rows)
    local = {n: t[rows].clone() for n, t in full.items()}
    out = build_loss(LossConfig())(local, DATA)
    assert torch.equal(out["targets"], torch.tensor([3, 4]))
    vol = det_volume(full["text"], full["vision"], full["audio"])  # (5, 5)
    m1, m2 = -vol[rows] / 0.07, -vol.T[rows] / 0.07
    targets = torch.tensor([3, 4])
    expected = 0.5 * sum(F.cross_entropy(m, targets, label_smoothing=0.1) for m in (m1, m2))
    torch.testing.assert_close(out["loss"].double(), expected.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["logits_anchor_to_data"].double(), m1, rtol=1e-5, atol=1e-5)


def test_config_validation_names_the_field() -> None:
    cases = {
        "name": dict(name="dot"),
        "temperature_parametrization": dict(temperature_parametrization="exp"),
        "temperature_init": dict(temperature_init=0.0),
        "label_smoothing": dict(label_smoothing=1.0),
        "dam_weight": dict(dam_weight=-0.1),
        "chunk_size": dict(chunk_size=-1),
        "temperature_min": dict(temperature_min=0.5, temperature_max=0.1),
    }
    for field, kwargs in cases.items():
        with pytest.raises(ValueError, match=field):
            LossConfig(**kwargs)
    LossConfig(temperature_parametrization="raw", temperature_init=5.0)  # range applies to "log" only


def test_registry_lists_all_similarities() -> None:
    assert list_similarities() == ["cosine", "symile", "triangle", "volume"]


def test_bad_embeddings_raise() -> None:
    loss_fn = build_loss(LossConfig())
    emb = embeddings()
    with pytest.raises(KeyError, match="depth"):
        loss_fn(emb, ["vision", "depth"])
    with pytest.raises(ValueError, match="anchor"):
        loss_fn(emb, ["vision", "text"])
    with pytest.raises(ValueError, match="same B"):
        loss_fn({**emb, "audio": emb["audio"][:3]}, DATA)


def test_custom_similarity_plugs_in() -> None:
    emb = embeddings()
    calls = []

    def dot(anchor: torch.Tensor, data, scale) -> torch.Tensor:
        calls.append(len(data))
        return scale * (anchor @ data[0].T).unsqueeze(0)

    out = ContrastiveLoss(LossConfig(gather_with_grad=True), similarity=dot)(emb, DATA)
    s = emb["text"] @ emb["vision"].T
    torch.testing.assert_close(out["loss"].double(), two_way(s, s.T, 0.07).double())
    assert calls == [2]


@pytest.mark.parametrize("gather_with_grad", [False, True])
@pytest.mark.parametrize("parametrization", ["raw", "log"])
def test_temperature_gradient_matches_reference(gather_with_grad: bool, parametrization: str) -> None:
    """The scale rides inside the similarity; d loss / d tau must still equal the plain division's."""
    emb = embeddings()
    loss_fn = build_loss(
        LossConfig(gather_with_grad=gather_with_grad, temperature_parametrization=parametrization)
    )
    loss_fn(emb, DATA)["loss"].backward()
    tau = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    double = {n: t.double() for n, t in emb.items()}
    reference_volume_loss(double, detach_other_side=not gather_with_grad, tau=tau).backward()
    expected = tau.grad * (0.07 if parametrization == "log" else 1.0)  # d tau / d log tau = tau
    torch.testing.assert_close(loss_fn.temperature_param.grad.double(), expected, rtol=1e-4, atol=1e-7)


def test_square_two_way_cross_entropy_matches_autograd() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = (5 * torch.randn(7, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    other = (5 * torch.randn(7, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    fused = contrastive._SquareTwoWayCrossEntropy.apply
    targets = torch.arange(7)
    row = F.cross_entropy(logits, targets, label_smoothing=0.1)
    col = F.cross_entropy(logits.T, targets, label_smoothing=0.1)
    torch.testing.assert_close(fused(logits, logits, 0.1), torch.stack([row, col]))
    assert torch.autograd.gradcheck(lambda x: fused(x, x, 0.1), (logits,))
    assert torch.autograd.gradcheck(lambda x: fused(x, x, 0.0), (logits,))
    # different matrices: rows of the first, columns of the second, each gradient to its own input
    assert torch.autograd.gradcheck(lambda x, y: fused(x, y, 0.1), (logits, other))
    other_col = F.cross_entropy(other.T, targets, label_smoothing=0.1)
    torch.testing.assert_close(fused(logits, other, 0.1), torch.stack([row, other_col]))


def test_one_rank_reference_semantics_computes_the_volume_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Detached gathering on one rank: one split computation, same loss and gradients as two."""
    volume_module = importlib.import_module("gram.losses.volume")  # the package re-exports a function
    base = embeddings()
    calls = []
    original = volume_module.orthonormal_basis
    monkeypatch.setattr(volume_module, "orthonormal_basis", lambda v: calls.append(1) or original(v))
    split_in = leaves(base)
    split_loss = build_loss(LossConfig(gather_with_grad=False))
    out = split_loss(split_in, DATA)
    assert len(calls) == 1
    out["loss"].backward()

    twice_in = leaves(base)
    twice_loss = build_loss(LossConfig(gather_with_grad=False))
    twice_loss.split_similarity = None  # the generic path: each direction computed on its own
    ref = twice_loss(twice_in, DATA)
    assert len(calls) == 3
    ref["loss"].backward()
    torch.testing.assert_close(out["loss"], ref["loss"])
    for key in (
        "loss_anchor_to_data",
        "loss_data_to_anchor",
        "logits_anchor_to_data",
        "logits_data_to_anchor",
    ):
        torch.testing.assert_close(out[key], ref[key])
    for name in base:
        assert split_in[name].grad is not None
        torch.testing.assert_close(split_in[name].grad, twice_in[name].grad)
    torch.testing.assert_close(split_loss.temperature_param.grad, twice_loss.temperature_param.grad)


@pytest.mark.parametrize("name", ["volume", "cosine", "symile", "triangle"])
def test_split_path_equals_computing_each_direction(name: str) -> None:
    """Every similarity: one-rank detached semantics give the reference's loss and gradients either way."""
    base = {n: t.detach() for n, t in _four_modalities().items()}
    data = [n for n in base if n != "text"]
    results = []
    for split in (True, False):
        emb = leaves(base)
        loss_fn = build_loss(LossConfig(name=name, gather_with_grad=False))
        if not split:
            loss_fn.split_similarity = None
        out = loss_fn(emb, data)
        out["loss"].backward()
        results.append((out, emb, loss_fn.temperature_param.grad))
    (out, emb, tau_grad), (ref, ref_emb, ref_tau_grad) = results
    torch.testing.assert_close(out["loss"], ref["loss"])
    torch.testing.assert_close(out["logits_data_to_anchor"], ref["logits_data_to_anchor"])
    for n in base:
        assert emb[n].grad is not None and emb[n].grad.abs().sum() > 0
        torch.testing.assert_close(emb[n].grad, ref_emb[n].grad)
    torch.testing.assert_close(tau_grad, ref_tau_grad)
