import pytest
import torch
import torch.nn.functional as F

from pagedlm.model.layers import matmul


@pytest.mark.parametrize("rows", [1, 7, 8, 64])
def test_upcast_path_matches_bf16_math(rows):
    torch.manual_seed(0)
    w = torch.randn(48, 32).bfloat16()
    b = torch.randn(48).bfloat16()
    x = torch.randn(rows, 32).bfloat16()
    ref = F.linear(x.float(), w.float(), b.float())
    try:
        for forced in (True, False):
            matmul.set_bf16_upcast(forced)
            y = matmul.linear(x, w, b)
            assert y.dtype == torch.bfloat16 and y.shape == (rows, 48)
            assert (y.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    finally:
        matmul.set_bf16_upcast(None)


def test_float32_never_upcast_or_changed():
    w, x = torch.randn(8, 4), torch.randn(16, 4)
    matmul.set_bf16_upcast(True)
    try:
        assert torch.equal(matmul.linear(x, w), F.linear(x, w))
    finally:
        matmul.set_bf16_upcast(None)


def test_dtype_auto_follows_hardware(monkeypatch):
    from pagedlm.model.registry import resolve_dtype

    monkeypatch.setattr(matmul, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(matmul, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="float8"):
        resolve_dtype("float8")
