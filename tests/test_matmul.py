import pytest
import torch
import torch.nn.functional as F

from pagedlm.model.layers import matmul


@pytest.mark.parametrize("rows", [1, 7, 8, 64])
def test_mixed_linear_matches_fp32_math_on_bf16_weights(rows):
    torch.manual_seed(0)
    w = torch.randn(48, 32).bfloat16()
    b = torch.randn(48)
    x = torch.randn(rows, 32)
    ref = F.linear(x, w.float(), b)
    y = matmul.linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (rows, 48)
    tol = 0.02 * ref.abs().max().item() if rows < matmul.UPCAST_MIN_ROWS else 1e-5
    assert (y - ref).abs().max().item() < tol  # few rows round the input to bf16; many rows are exact


@pytest.mark.parametrize("rows", [1, 2, 16, 127, 128, 300])
def test_same_dtype_matches_linear(rows):
    w, b, x = torch.randn(40, 24), torch.randn(40), torch.randn(rows, 24)
    y = matmul.linear(x, w, b)
    assert y.shape == (rows, 40) and y.is_contiguous()
    assert torch.allclose(y, F.linear(x, w, b), atol=1e-5)


def test_split_dtype(monkeypatch):
    monkeypatch.setattr(matmul, "cpu_has_native_bf16", lambda: False)
    assert matmul.split_dtype(torch.bfloat16) == (torch.bfloat16, torch.float32)
    assert matmul.split_dtype(torch.bfloat16, "cuda") == (torch.bfloat16, torch.bfloat16)
    assert matmul.split_dtype(torch.float32) == (torch.float32, torch.float32)
    monkeypatch.setattr(matmul, "cpu_has_native_bf16", lambda: True)
    assert matmul.split_dtype(torch.bfloat16) == (torch.bfloat16, torch.bfloat16)


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
