"""Where each loss term sends gradient (paper §3.2-3.3): codebooks, encoder, e_v, SID embeddings, teacher."""

from __future__ import annotations

import torch

from dig_torchrec.model import DIGModel
from test_model_helpers import initialized_model, make_batch, tiny_config, tiny_meta


def _model(**sections) -> DIGModel:
    return initialized_model(tiny_config(**sections))


def _grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def _nonzero(grads) -> bool:
    return any(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_codebooks_get_no_grad_and_move_only_by_ema():
    model = _model(tokenizer={"restart_dead_codes": False})
    q = model.tokenizer.quantizer
    assert all(not n.startswith("tokenizer.quantizer") for n, _ in model.named_parameters())
    meta = tiny_meta()
    batch = make_batch(meta, seed=3, pad_rows=2)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    parts = model.forward_parts(batch)
    parts.terms.total.backward()
    assert torch.equal(q.codebooks, before["codebooks"])  # the forward itself moves nothing
    model.on_step_accepted(parts.output)  # the EMA step
    assert q.codebooks.grad is None and not q.codebooks.requires_grad
    # expected EMA step recomputed by hand from the same batch (first step primes the counts)
    mask = torch.cat([batch.weights, batch.retrieval_weights]) > 0
    sids = parts.computed.sids[mask]
    r = [parts.computed.e_v.detach().flatten(1)[mask]]
    for layer in range(q.num_layers):
        r.append(r[-1] - before["codebooks"][layer][sids[:, layer]])
    a, eps, k = q.decay, q.epsilon, q.num_codes
    n_rows = float(mask.sum())
    for layer in range(q.num_layers):
        counts = torch.bincount(sids[:, layer], minlength=k).float()
        sums = torch.zeros(k, q.dim).index_add_(0, sids[:, layer], r[layer])
        c0 = before["ema_count"][layer] * n_rows  # fractions -> per-step counts
        s0 = before["codebooks"][layer] * c0[:, None]
        count = a * c0 + (1 - a) * counts
        smoothed = (count + eps) / (count.sum() + k * eps) * count.sum()
        expected = (a * s0 + (1 - a) * sums) / smoothed[:, None]
        torch.testing.assert_close(q.codebooks[layer], expected, rtol=1e-4, atol=1e-5)
    # an optimizer step over every parameter leaves the codebooks where EMA put them
    after_ema = q.codebooks.clone()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert torch.equal(q.codebooks, after_ema)
    # eval-mode forwards never move them
    model.eval()
    _, out = model(batch)
    model.on_step_accepted(out)
    assert torch.equal(q.codebooks, after_ema)


def test_encoder_gets_grad_from_rank_commit_and_sem():
    model = _model()
    parts = model.forward_parts(make_batch(tiny_meta(), seed=1))
    enc = list(model.tokenizer.encoder.parameters())
    for term in ("rank", "commit", "sem"):
        assert _nonzero(_grads(getattr(parts.terms, term), enc)), f"encoder gets no gradient from L_{term}"


def test_e_v_gets_no_grad_from_recall_or_u2t():
    model = _model()
    parts = model.forward_parts(make_batch(tiny_meta(), seed=1))
    e_v = parts.computed.e_v
    for term in ("recall", "u2t"):
        (g,) = _grads(getattr(parts.terms, term), [e_v])
        assert g is None or float(g.abs().sum()) == 0.0, f"e_v gets gradient from L_{term}"
    (g,) = _grads(parts.terms.rank, [e_v])
    assert g is not None and float(g.abs().sum()) > 0


def test_sid_embeddings_get_grad_from_recall_and_u2t_not_rank():
    model = _model()
    parts = model.forward_parts(make_batch(tiny_meta(), seed=2))
    sid = list(model.sid_embedding_bags.parameters())
    assert _nonzero(_grads(parts.terms.recall, sid))
    assert _nonzero(_grads(parts.terms.u2t, sid))
    assert not _nonzero(_grads(parts.terms.rank, sid))


def test_teacher_is_stop_gradient():
    model = _model()
    batch = make_batch(tiny_meta(), seed=4)
    batch.retrieval_u2i.requires_grad_(True)
    parts = model.forward_parts(batch)
    assert not parts.computed.loss_inputs.u2t_teacher.requires_grad
    for term in ("u2t", "recall"):
        (g,) = _grads(getattr(parts.terms, term), [batch.retrieval_u2i])
        assert g is None, f"gradient reaches the teacher's u2i through L_{term}"
    # ...while the student (MLP_u2t) is trained by L_u2t
    assert _nonzero(_grads(parts.terms.u2t, list(model.u2t_mlp.parameters())))
