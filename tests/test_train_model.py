"""Training on pagedlm's model code against transformers: same weights, same batch -> same loss
and the same gradient for every parameter (fp32). The causal backend against the torch backend.

Tolerance: both sides run the same float32 math in a different order (fused qkv / gate-up, SDPA
vs eager), so they differ by rounding only (observed ~1e-7 relative); a real bug (a wrong mask,
a missed norm offset, a label shifted by one) moves the loss or a gradient by 1e-3 or more.
"""

from __future__ import annotations

import pytest
import torch

from pagedlm.config import ModelConfig
from pagedlm.model.layers.attention import BACKENDS, AttentionMetadata, CausalMetadata, PrefillSegment
from pagedlm.model.registry import build_model, load_model
from pagedlm.train.model import IGNORE, Batch, loss_sum, make_trainable
from tests.helpers import hf_tiny

DENSE = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3", "gpt2"]


def _batch(vocab: int, b: int = 2, t: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    hf_labels = ids.clone()
    hf_labels[0, :3] = IGNORE  # a prompt that is not trained on
    return ids, hf_labels


def _ours(ids: torch.Tensor, hf_labels: torch.Tensor) -> Batch:
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = hf_labels[:, 1:]  # pagedlm's labels are already shifted
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    return Batch(ids, labels, pos)


def _grads_in_our_layout(model_cfg: ModelConfig, hf) -> dict[str, torch.Tensor]:
    """HF's gradients loaded through pagedlm's own checkpoint mapping (fusing q/k/v, gate/up,
    transposing GPT-2's Conv1D) into a model of pagedlm's layout."""
    from pagedlm.loader.weights import load_weights

    holder = build_model(model_cfg, torch.float32)
    load_weights(holder, ((n, p.grad if p.grad is not None else torch.zeros_like(p))
                          for n, p in hf.named_parameters()))
    return dict(holder.named_parameters())


@pytest.mark.parametrize("kind", DENSE)
def test_loss_and_grads_match_transformers(kind, tmp_path):
    hf = hf_tiny(kind)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    ours = make_trainable(load_model(str(tmp_path), cfg, torch.float32))
    ids, hf_labels = _batch(cfg.vocab_size)

    hf.eval()  # no dropout (GPT-2's config has 0.1; pagedlm trains without dropout)
    ref = hf(input_ids=ids, labels=hf_labels).loss
    ref.backward()

    batch = _ours(ids, hf_labels)
    loss = loss_sum(ours, batch) / batch.num_targets
    loss.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()), (loss.item(), ref.item())

    expected = _grads_in_our_layout(cfg, hf)
    for name, p in ours.named_parameters():
        g, e = p.grad, expected[name]
        assert g is not None, name
        tol = 1e-4 * max(e.abs().max().item(), 1e-3)
        err = (g - e).abs().max().item()
        assert err <= tol, f"{kind} {name}: grad max abs diff {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_checkpointing_gives_same_grads(kind, tmp_path):
    hf_tiny(kind).save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    ids, hf_labels = _batch(cfg.vocab_size)
    grads = []
    for ckpt in (False, True):
        model = make_trainable(load_model(str(tmp_path), cfg, torch.float32), checkpointing=ckpt)
        loss_sum(model, _ours(ids, hf_labels)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("window", [None, 5])
def test_causal_backend_matches_torch_backend(window):
    """Packed rows (block-diagonal) in the causal backend == each example alone through the
    paged reference backend."""
    torch.manual_seed(0)
    heads, kvh, d, bs = 4, 2, 8, 4
    lens = [[5, 7], [12]]  # two rows of 12 tokens: two packed examples, one whole
    t = 12
    q = torch.randn(2 * t, heads, d)
    k = torch.randn(2 * t, kvh, d)
    v = torch.randn(2 * t, kvh, d)
    seg = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    out = BACKENDS["causal"].forward(q, k, v, None, CausalMetadata(2, t, seg), 0.3, window)
    start = 0
    for row in lens:
        for n in row:
            nb = (n + bs - 1) // bs
            cache = torch.zeros(2, nb, bs, kvh, d)
            table = torch.arange(nb)
            meta = AttentionMetadata(slot_mapping=torch.arange(n), block_size=bs,
                                     prefills=[PrefillSegment(0, n, n, table)])
            ref = BACKENDS["torch"].forward(q[start:start + n], k[start:start + n], v[start:start + n],
                                            cache, meta, 0.3, window)
            torch.testing.assert_close(out[start:start + n], ref, rtol=1e-5, atol=1e-6)
            start += n


def test_trainable_build_initialises_and_trains(tmp_path):
    hf_tiny("llama").save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    torch.manual_seed(0)
    model = build_model(cfg, torch.float32, trainable=True)
    assert model.training and all(p.requires_grad for p in model.parameters())
    w = model.model.layers["0"].self_attn.qkv_proj.weight
    assert abs(w.std().item() - 0.02) < 0.002 and torch.isfinite(w).all()
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    batch = _ours(ids, ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(10):  # memorising one batch: the loss must fall
        opt.zero_grad()
        loss = loss_sum(model, batch) / batch.num_targets
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first - 1.0
    # the default build is unchanged: eval mode, frozen
    frozen = build_model(cfg, torch.float32)
    assert not frozen.training and not frozen.model.layers["0"].self_attn.qkv_proj.weight.requires_grad


TILE_CASES = {
    # several examples per tile and several tiles per row, padding inside and at the end of rows
    "regrouped": [[0] * 9 + [1] * 3 + [2] * 14 + [-1] * 6, [0] * 20 + [1] * 7 + [-1] * 5,
                  [-1] * 4 + [3] * 10 + [4] * 18],
    "one-per-row-padded": [[0] * 21 + [-1] * 3, [0] * 24],  # plain causal per tile, gathered
    "rows": [[0] * 16, [0] * 16],  # pretraining rows: the tiles are the rows
}


@pytest.mark.parametrize("case", sorted(TILE_CASES))
@pytest.mark.parametrize("window", [None, 6])
def test_causal_tiles_equal_dense_block_diagonal_attention(case, window):
    """Packed examples regrouped into tiles give the dense block-diagonal mask's outputs and
    gradients; padding outputs are zero."""
    from pagedlm.model.layers.attention import causal_tiles

    torch.manual_seed(0)
    heads, kvh, d = 4, 2, 8
    seg = torch.tensor(TILE_CASES[case])
    b, t = seg.shape
    tiles = causal_tiles(seg, window)
    assert (tiles.n > b) == (case == "regrouped")  # really regrouped, not one tile per row
    assert tiles.identity == (case == "rows")
    assert (tiles.mask is None) == (case != "regrouped" and window is None)
    q = torch.randn(b * t, heads, d, requires_grad=True)
    k = torch.randn(b * t, kvh, d, requires_grad=True)
    v = torch.randn(b * t, kvh, d, requires_grad=True)
    out = BACKENDS["causal"].forward(q, k, v, None, CausalMetadata(b, t, seg), 0.3, window)
    i = torch.arange(t)
    m = (i[None, :] <= i[:, None]) & (seg[:, :, None] == seg[:, None, :])  # (b, t, t)
    if window is not None:
        m = m & (i[None, :] > i[:, None] - window)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.view(b, t, heads, d).transpose(1, 2), k.view(b, t, kvh, d).transpose(1, 2),
        v.view(b, t, kvh, d).transpose(1, 2), attn_mask=m[:, None], scale=0.3, enable_gqa=True)
    ref = ref.transpose(1, 2).reshape(b * t, heads, d)
    real = (seg >= 0).reshape(-1)
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-6)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))
    w = torch.randn_like(out) * real[:, None, None]
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
