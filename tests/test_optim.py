"""Sophia (paper form) with neuron masks, curvature estimators, AdamW wrapper."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simu_core.errors import SimuError
from simu_core.optim import (
    AdamW,
    Sophia,
    TrainableParam,
    clip_gradients,
    gnb_diagonal,
    hutchinson_diagonal,
    squared_gradient,
)

B1, B2, RHO, EPS, LR, WD = 0.9, 0.95, 0.5, 1e-12, 0.05, 0.1


def _transcribe(theta0, grads, hhats, k, masks=None):
    """Sophia written straight from the paper's formulas, in float64 (one tensor per parameter).

    `masks[i]` (bool, shaped like the parameter, or None) restricts every update to its entries.
    """
    theta = [t.double().clone() for t in theta0]
    m = [torch.zeros_like(t) for t in theta]
    h = [torch.zeros_like(t) for t in theta]
    for t, (g_t, hh_t) in enumerate(zip(grads, hhats, strict=True), start=1):
        for i in range(len(theta)):
            keep = torch.ones_like(theta[i], dtype=torch.bool) if masks is None or masks[i] is None else masks[i]
            g = g_t[i].double()
            m[i] = torch.where(keep, B1 * m[i] + (1 - B1) * g, m[i])
            if t % k == 1 % k:
                h[i] = torch.where(keep, B2 * h[i] + (1 - B2) * hh_t[i].double(), h[i])
            decayed = theta[i] - LR * WD * theta[i]
            step = torch.clamp(m[i] / torch.clamp(RHO * h[i], min=EPS), -1, 1)
            theta[i] = torch.where(keep, decayed - LR * step, theta[i])
    return theta


def _hand_made(seed=0, steps=6):
    gen = torch.Generator().manual_seed(seed)
    theta0 = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in theta0] for _ in range(steps)]
    # Curvatures spread over [0, 2] so that some coordinates clip and some do not.
    hhats = [[2 * torch.rand(t.shape, generator=gen) for t in theta0] for _ in range(steps)]
    return theta0, grads, hhats


def _run_sophia(theta0, grads, hhats, k, index=None, **kwargs):
    params = [nn.Parameter(t.clone()) for t in theta0]
    tps = [TrainableParam("w", params[0], dim=1, index=index), TrainableParam("b", params[1])]
    opt = Sophia(tps, lr=LR, betas=(B1, B2), rho=RHO, weight_decay=WD, eps=EPS, update_interval=k, **kwargs)
    stats = []
    for g_t, hh_t in zip(grads, hhats, strict=True):
        for p, g in zip(params, g_t, strict=True):
            p.grad = g.clone()
        stats.append(opt.step(lambda hh_t=hh_t: [x.clone() for x in hh_t]))
    return params, stats


# Tolerance: float32 arithmetic against a float64 transcription over 6 steps; values are O(1),
# so 1e-5 absolute is ~100 float32 ulps of headroom while a wrong formula is off by >= 1e-3.
@pytest.mark.parametrize("k", [1, 2, 4])
def test_sophia_matches_the_paper_formulas(k):
    theta0, grads, hhats = _hand_made()
    params, stats = _run_sophia(theta0, grads, hhats, k)
    expected = _transcribe(theta0, grads, hhats, k)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach().double(), e, atol=1e-5, rtol=0)
    assert any(0.0 < s.unclipped_fraction < 1.0 for s in stats)  # the example exercises both clip branches


def test_masked_sophia_matches_the_formulas_restricted_to_the_mask():
    theta0, grads, hhats = _hand_made(seed=1)
    index = torch.tensor([0, 2])
    params, _ = _run_sophia(theta0, grads, hhats, k=2, index=index)
    col = torch.zeros(3, 4, dtype=torch.bool)
    col[:, index] = True
    expected = _transcribe(theta0, grads, hhats, 2, masks=[col, None])
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach().double(), e, atol=1e-5, rtol=0)


def test_all_true_mask_is_exactly_the_unmasked_optimizer():
    theta0, grads, hhats = _hand_made(seed=2)
    unmasked, _ = _run_sophia(theta0, grads, hhats, k=2)
    masked, _ = _run_sophia(theta0, grads, hhats, k=2, index=torch.arange(4))
    for a, b in zip(unmasked, masked, strict=True):
        assert torch.equal(a, b)


def test_entries_outside_the_mask_stay_bit_identical_with_weight_decay():
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(16, 32, generator=gen)
    w = nn.Parameter(w0.clone())
    index = torch.tensor([1, 5, 6, 30])
    opt = Sophia([TrainableParam("w", w, dim=1, index=index)], lr=0.01, weight_decay=0.5, update_interval=3)
    for _ in range(200):
        w.grad = torch.randn(w.shape, generator=gen)
        opt.step(lambda: [torch.rand(w.shape, generator=gen)])
    outside = torch.ones(32, dtype=torch.bool)
    outside[index] = False
    assert torch.equal(w.detach()[:, outside], w0[:, outside])
    assert (w.detach()[:, index] != w0[:, index]).all()


def test_optimizer_state_covers_only_the_trainable_entries():
    w = nn.Parameter(torch.zeros(64, 512))
    opt = Sophia([TrainableParam("w", w, dim=1, index=torch.arange(0, 512, 16))], lr=1e-3)
    assert opt.state_bytes() == 2 * 4 * 64 * 32  # m and h, float32, 32 of 512 columns


def test_squared_gradient_estimator_gives_soul_curvature():
    theta0, grads, _ = _hand_made(seed=4)
    params = [nn.Parameter(t.clone()) for t in theta0]
    opt = Sophia([TrainableParam(str(i), p) for i, p in enumerate(params)], lr=LR, betas=(B1, B2), rho=RHO,
                 weight_decay=WD, eps=EPS, update_interval=1)  # fmt: skip
    for g_t in grads:
        for p, g in zip(params, g_t, strict=True):
            p.grad = g.clone()
        opt.step(lambda: squared_gradient(params))
    expected = _transcribe(theta0, grads, [[g.square() for g in g_t] for g_t in grads], k=1)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach().double(), e, atol=1e-5, rtol=0)


def test_sophia_with_hutchinson_on_a_separable_loss_uses_the_exact_diagonal():
    # loss = sum(c * theta^4) / 4 has a diagonal Hessian 3 c theta^2, and with Rademacher u,
    # u * (H u) = u^2 H_ii = H_ii exactly, so the run is deterministic and can be transcribed.
    c = torch.tensor([0.5, 1.0, 2.0, 4.0])
    theta0 = torch.tensor([1.0, -0.5, 0.25, 2.0])
    p = nn.Parameter(theta0.clone())
    opt = Sophia([TrainableParam("p", p)], lr=LR, betas=(B1, B2), rho=RHO, weight_decay=WD, eps=EPS,
                 update_interval=2)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    theta = theta0.double().clone()
    grads, hhats = [], []
    for _ in range(5):
        grads.append((c * theta**3).float())
        hhats.append((3 * c * theta**2).float())
        theta = _transcribe_prefix_then_step(theta0, grads, hhats)
        p.grad = None
        loss = (c * p**4).sum() / 4
        loss.backward(create_graph=False)
        opt.step(lambda: hutchinson_diagonal((c * p**4).sum() / 4, [p], gen))
        torch.testing.assert_close(p.detach().double(), theta, atol=1e-5, rtol=0)


def _transcribe_prefix_then_step(theta0, grads, hhats):
    return _transcribe([theta0], [[g] for g in grads], [[h] for h in hhats], k=2)[0]


N_SAMPLES = 400  # estimator draws per expectation test (each is one tiny backward)


class _SoftmaxLM(nn.Module):
    """A tiny non-linear 'LM' (embedding -> tanh layer -> vocabulary logits) with an HF-like output."""

    def __init__(self, vocab=5, d=3):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.out(torch.tanh(self.hidden(self.emb(input_ids)))))


def _flat_fn(model, names, shapes, x, fn):
    """fn(model output on x) as a function of a flat parameter vector (for torch.autograd.functional)."""

    def wrapped(flat):
        tensors, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            n = shape.numel()
            tensors[name] = flat[start : start + n].view(shape)
            start += n
        return fn(torch.func.functional_call(model, tensors, (x,)))

    return wrapped


def test_gnb_expectation_matches_the_exact_gauss_newton_diagonal():
    model = _SoftmaxLM()
    x = torch.tensor([0, 1, 2, 3, 4, 1])
    names, params = zip(*model.named_parameters(), strict=True)
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().flatten() for p in params]).double()
    model.double()
    logits_of = _flat_fn(model, names, shapes, x, lambda out: out.logits)
    jac = torch.autograd.functional.jacobian(logits_of, flat)  # [B, V, P]
    probs = torch.softmax(logits_of(flat), dim=-1)
    cov = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # [B, V, V]
    exact = torch.einsum("bvp,bvw,bwp->p", jac, cov, jac) / len(x)  # GN diagonal of the mean CE
    model.float()
    gen = torch.Generator().manual_seed(0)
    samples = torch.stack(
        [torch.cat([e.flatten() for e in gnb_diagonal(model(x).logits, params, gen)]) for _ in range(N_SAMPLES)]
    ).double()
    mean, se = samples.mean(0), samples.std(0) / N_SAMPLES**0.5
    # Within 5 standard errors per coordinate (+1e-6 for float32 rounding of exactly-zero entries).
    assert ((mean - exact).abs() <= 5 * se + 1e-6).all()
    assert int((5 * se < 0.5 * exact.abs()).sum()) >= 5  # tight enough to catch a factor-2 error


def test_hutchinson_expectation_matches_the_exact_hessian_diagonal():
    model = _SoftmaxLM()
    x, y = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0])
    names, params = zip(*model.named_parameters(), strict=True)
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().flatten() for p in params]).double()
    model.double()
    loss_of = _flat_fn(model, names, shapes, x, lambda out: F.cross_entropy(out.logits, y))
    exact = torch.diagonal(torch.autograd.functional.hessian(loss_of, flat))
    gen = torch.Generator().manual_seed(0)
    samples = torch.stack(
        [
            torch.cat([e.flatten() for e in hutchinson_diagonal(F.cross_entropy(model(x).logits, y), params, gen)])
            for _ in range(N_SAMPLES)
        ]
    )
    mean, se = samples.mean(0), samples.std(0) / N_SAMPLES**0.5
    # 5 standard errors per coordinate (float64 model, so no rounding allowance needed beyond 1e-9).
    assert ((mean - exact).abs() <= 5 * se + 1e-9).all()
    # Off-diagonal terms make u * (H u) noisy; enough coordinates must still resolve a factor-2 error.
    assert int((5 * se < 0.5 * exact.abs()).sum()) >= 5


def test_clipping_measures_only_trainable_entries():
    w = nn.Parameter(torch.zeros(2, 3))
    w.grad = torch.tensor([[3.0, 100.0, 0.0], [4.0, 100.0, 0.0]])
    tp = TrainableParam("w", w, dim=1, index=torch.tensor([0]))
    assert clip_gradients([tp], max_norm=1.0) == pytest.approx(5.0)
    torch.testing.assert_close(w.grad[:, 0], torch.tensor([0.6, 0.8]))


def test_adamw_wrapper_equals_torch_adamw():
    theta0, grads, _ = _hand_made(seed=5)
    mine = [nn.Parameter(t.clone()) for t in theta0]
    ref = [nn.Parameter(t.clone()) for t in theta0]
    opt = AdamW([TrainableParam(str(i), p) for i, p in enumerate(mine)], lr=0.01, weight_decay=0.1)
    torch_opt = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1)
    for g_t in grads:
        for a, b, g in zip(mine, ref, g_t, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    for a, b in zip(mine, ref, strict=True):
        assert torch.equal(a, b)
    assert opt.state_bytes() == 2 * 4 * sum(t.numel() for t in theta0)


@pytest.mark.parametrize("lr", [0.0, -1e-3])
def test_non_positive_learning_rate_is_refused(lr):
    with pytest.raises(SimuError, match="learning rate"):
        Sophia([TrainableParam("w", nn.Parameter(torch.zeros(2)))], lr=lr)


def test_empty_trainable_set_is_refused():
    with pytest.raises(SimuError, match="nothing to train"):
        Sophia([], lr=1e-3)


def test_adamw_refuses_masks():
    w = nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(SimuError, match="Sophia"):
        AdamW([TrainableParam("w", w, dim=1, index=torch.tensor([0]))], lr=1e-3)


class _Block(nn.Module):
    """Linear -> tanh -> Linear, or the GPT-2 Conv1D equivalent (weights stored [in, out])."""

    def __init__(self, conv1d: bool):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.up = Conv1D(12, 4) if conv1d else nn.Linear(4, 12)  # 12 neurons
        self.down = Conv1D(4, 12) if conv1d else nn.Linear(12, 4)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.parametrize("conv1d", [False, True])
def test_slice_leaves_give_the_gathered_full_gradient_and_identical_outputs(conv1d):
    from simu_core.optim import SliceLeaves

    index = torch.tensor([2, 5, 11])
    down_dim, up_dim = (0, 1) if conv1d else (1, 0)  # neuron axis of the output / input projections

    def trainables(model):
        return [
            TrainableParam("down.weight", model.down.weight, down_dim, index),
            TrainableParam("up.weight", model.up.weight, up_dim, index),
            TrainableParam("up.bias", model.up.bias, 0, index, decay=False),
        ]

    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    full, sliced = _Block(conv1d), _Block(conv1d)
    full_out = full(x)
    full_out.square().sum().backward()
    tps = trainables(sliced)
    leaves = SliceLeaves(sliced, tps)
    out = sliced(x)
    out.square().sum().backward()
    assert torch.equal(out, full_out)  # the zero-valued hook term changes no output bit
    for tp, ref in zip(tps, trainables(full), strict=True):
        assert tp.param.grad is None  # no full-size gradient was built
        # Same products summed in a different order: float32 rounding only.
        torch.testing.assert_close(tp.grad(), ref.gather(ref.param.grad), atol=1e-6, rtol=1e-5)
    leaves.remove()
    assert all(tp.leaf is None for tp in tps) and not sliced._forward_hooks and not sliced.down._forward_hooks


@pytest.mark.slow
def test_hutchinson_through_slice_leaves_matches_the_exact_hessian_of_the_real_model(builtin_dir):
    """Second derivatives through the compact leaves of a masked down_proj equal the true ones."""
    from simu_core import data as qa
    from simu_core.arch import neuron_layers
    from simu_core.losses import mean_nll
    from simu_core.models import load_model
    from simu_core.optim import SliceLeaves

    loaded = load_model("builtin:full", device="cpu", root=builtin_dir, attn_implementation="eager")
    examples = qa.encode_dataset(loaded.tokenizer, loaded.fmt, qa.load_data("builtin:forget10", root=builtin_dir))
    batch = qa.collate(examples[:2], qa.pad_id_of(loaded.tokenizer))
    model = loaded.model.double()
    for p in model.parameters():
        p.requires_grad_(False)
    layer, index = neuron_layers(model)[0], torch.tensor([3, 100])
    name, weight = f"{layer.down_name}.weight", layer.down.weight.detach().clone()

    def loss_of(slices):  # the loss as a function of the selected columns only
        w = weight.index_copy(1, index, slices.view(weight.shape[0], len(index)))
        return mean_nll(lambda **kw: torch.func.functional_call(model, {name: w}, (), kw), batch)

    exact = torch.diagonal(torch.autograd.functional.hessian(loss_of, weight.index_select(1, index).flatten()))
    tp = TrainableParam(name, layer.down.weight, 1, index)
    SliceLeaves(model, [tp])
    gen, n = torch.Generator().manual_seed(0), 1000
    samples = torch.stack(
        [hutchinson_diagonal(mean_nll(model, batch), [tp.target], gen)[0].flatten() for _ in range(n)]
    )
    mean, se = samples.mean(0), samples.std(0) / n**0.5
    assert ((mean - exact).abs() <= 5 * se + 1e-9).all()  # 5 standard errors per coordinate (float64)
    # Power: the off-diagonal Hessian terms make a single probe's spread about as large as the diagonal itself,
    # so n = 1000 probes are needed for several coordinates to be resolved well enough that a factor-2 error
    # in them would break the assertion above (200 probes resolved only one on the test build; 1000 resolve 63).
    assert int((5 * se < 0.5 * exact.abs()).sum()) >= 3


# --------------------------------------------------------------------------- rho for a share of unclipped coordinates


def test_rho_for_share_leaves_that_share_unclipped():
    from simu_core.unlearn import rho_for_share

    ratios = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) * 5
    for share in (0.1, 0.3, 0.5):
        rho = rho_for_share(ratios, share)
        assert abs(float((ratios < rho).float().mean()) - share) <= 1e-3  # one coordinate of 10,000 at most


def test_rho_for_share_handles_coordinates_without_curvature():
    from simu_core.unlearn import rho_for_share

    ratios = torch.tensor([0.5, 1.0, float("inf"), float("inf")])
    assert math.isfinite(rho_for_share(ratios, 0.9)) and rho_for_share(ratios, 0.9) > 1.0
