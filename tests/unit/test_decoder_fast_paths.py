"""The model's faster formulations against the plain ones: oneDNN `Linear` (decoder, vision
encoder, abstractor), MAM norm lookup."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from owl.model import get_config, linear
from owl.model.decoder import DecoderLayer
from owl.model.linear import Linear


@pytest.mark.parametrize(("in_features", "out_features"), [(16, 24), (24, 16)])
@pytest.mark.parametrize(
    ("x_grad", "w_grad", "bias"),
    [
        (True, True, False),
        (True, False, False),
        (False, True, False),
        (True, True, True),
        (True, False, True),  # frozen weight and bias (a LoRA base)
        (False, True, True),
    ],
)
def test_linear_matches_f_linear_with_gradients(
    in_features: int, out_features: int, x_grad: bool, w_grad: bool, bias: bool, monkeypatch
) -> None:
    """Both orders of the weight-gradient product, with and without bias (the vision encoder's and
    abstractor's linears have one), frozen inputs or parameters (LoRA bases), and a strided input;
    the oneDNN path is taken even at these tiny sizes (and on an Intel CPU)."""
    monkeypatch.setattr(linear, "_ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(linear, "PREFER_ONEDNN", True)
    torch.manual_seed(0)
    layer = Linear(in_features, out_features, bias=bias)
    params = list(layer.parameters())
    for param in params:
        param.requires_grad_(w_grad)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    base = torch.randn(3, 7, 2 * in_features, requires_grad=x_grad)
    x = base[..., ::2]  # (3, 7, in), not contiguous
    grad = torch.randn(3, 7, out_features)
    ours = layer(x)
    theirs = F.linear(x, layer.weight, layer.bias)
    if linear._HAS_ONEDNN:
        assert type(ours.grad_fn).__name__ == "_OneDNNLinearBackward"
    assert (ours - theirs).abs().max() <= 1e-5
    wanted = ([base] if x_grad else []) + (params if w_grad else [])
    for a, b in zip(
        torch.autograd.grad(ours, wanted, grad), torch.autograd.grad(theirs, wanted, grad)
    ):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5


def test_linear_keeps_nn_linear_parameters() -> None:
    """Same parameter names as nn.Linear (state_dict keys the weight loaders depend on)."""
    for bias in (True, False):
        ours, theirs = Linear(8, 4, bias=bias), nn.Linear(8, 4, bias=bias)
        assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # mkldnn.flags' own
def test_linear_is_f_linear_outside_fp32_cpu_and_for_small_products(
    bias: bool, monkeypatch
) -> None:
    layer = Linear(8, 4, bias=bias)
    x = torch.randn(2, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # 64 multiply-adds: MKL
    monkeypatch.setattr(linear, "_ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(linear, "PREFER_ONEDNN", True)
    if linear._HAS_ONEDNN:
        assert layer(x).grad_fn.name() == "_OneDNNLinearBackward"
    with torch.backends.mkldnn.flags(enabled=False):
        assert layer(x).grad_fn.name() != "_OneDNNLinearBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).grad_fn.name() != "_OneDNNLinearBackward"
    layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    monkeypatch.setattr(linear, "_HAS_ONEDNN", False)  # a torch without the op
    layer, x = layer.float(), x.float()
    assert layer(x).grad_fn.name() != "_OneDNNLinearBackward"


def test_linear_is_f_linear_where_blas_is_faster(monkeypatch) -> None:
    """On an Intel CPU `Linear` is F.linear (MKL) at every size; elsewhere oneDNN above the size."""
    assert linear.cpu_vendor("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t: avx") == (
        "GenuineIntel"
    )
    assert linear.cpu_vendor("vendor_id : AuthenticAMD\n") == "AuthenticAMD"
    assert linear.cpu_vendor("processor : 0\nCPU implementer : 0x41\n") == ""  # Arm

    def cpuinfo_file():  # reading stops at the first vendor_id (not every CPU's entry)
        yield "processor\t: 0"
        yield "vendor_id\t: AuthenticAMD"
        raise AssertionError("read past the first vendor_id")

    assert linear._vendor_id(cpuinfo_file()) == "AuthenticAMD"
    assert linear.PREFER_ONEDNN is (linear.cpu_vendor() != "GenuineIntel")
    layer = Linear(64, 128)
    x = torch.randn(4, 64, 64)  # 2M multiply-adds: oneDNN's size
    monkeypatch.setattr(linear, "PREFER_ONEDNN", False)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer(x).grad_fn.name() != "_OneDNNLinearBackward"
    monkeypatch.setattr(linear, "PREFER_ONEDNN", True)
    if linear._HAS_ONEDNN:
        assert layer(x).grad_fn.name() == "_OneDNNLinearBackward"


@pytest.mark.parametrize("which", ["input_norm", "post_attn_norm"])
def test_mam_norm_lookup_equals_two_norms_and_a_select(which: str) -> None:
    torch.manual_seed(0)
    layer = DecoderLayer(get_config("debug-tiny", "owl2").decoder)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.3)
    x = torch.randn(2, 9, layer.input_norm.weight.shape[0], requires_grad=True)
    visual = (torch.rand(2, 9) < 0.4)[..., None]
    text_norm, visual_norm = getattr(layer, which), getattr(layer, f"{which}_visual")
    params = [x, text_norm.weight, visual_norm.weight]
    grad = torch.randn_like(x)

    ours = layer._norm(x, visual, which)
    # A hooked norm (as under ZeRO-3) is called as a module: the plain two-norm formulation.
    handle = text_norm.register_forward_pre_hook(lambda *_: None)
    hooked = layer._norm(x, visual, which)
    handle.remove()
    plain = torch.where(visual, visual_norm(x), text_norm(x))
    assert torch.equal(ours, plain) and torch.equal(hooked, plain)
    for a, b in zip(
        torch.autograd.grad(ours, params, grad), torch.autograd.grad(plain, params, grad)
    ):
        assert (a - b).abs().max() <= 1e-5
