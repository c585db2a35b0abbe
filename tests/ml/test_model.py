import pytest
import torch

from snunet_cbam.model import SNUNetCBAM, count_parameters

# Fang et al. 2021, Table: SNUNet-CD/16, /32, /48.
PAPER_PARAMETERS = {16: 3.01e6, 32: 12.03e6, 48: 27.06e6}


@pytest.mark.parametrize("width", [16, 32, 48])
def test_parameter_count_matches_the_paper(width):
    params = count_parameters(SNUNetCBAM(base_channel=width))
    assert abs(params - PAPER_PARAMETERS[width]) / PAPER_PARAMETERS[width] < 0.05


@pytest.mark.parametrize("width", [16, 32, 48])
def test_logits_have_the_input_resolution(width):
    model = SNUNetCBAM(base_channel=width).eval()
    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(a, b).shape == (2, 1, 32, 32)


@pytest.mark.parametrize("size", [(37, 50), (16, 16), (100, 20)])
def test_any_input_size_is_padded_and_cropped_back(size):
    model = SNUNetCBAM(base_channel=4).eval()
    a = torch.randn(1, 3, *size)
    with torch.no_grad():
        assert model(a, a).shape == (1, 1, *size)


def test_attention_can_be_switched_off():
    with_attention = SNUNetCBAM(base_channel=8, use_attention=True)
    plain = SNUNetCBAM(base_channel=8, use_attention=False)
    assert not hasattr(plain, "spatial") and hasattr(with_attention, "spatial")
    assert count_parameters(plain) < count_parameters(with_attention)
    a = torch.randn(2, 3, 32, 32)
    assert plain(a, a).shape == with_attention(a, a).shape


def test_encoder_is_shared_and_both_dates_matter():
    torch.manual_seed(0)
    model = SNUNetCBAM(base_channel=4).eval()
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model(a, b), model(a, a))
        assert not torch.allclose(model(a, b), model(b, b))
    # One encoder for both dates: no second set of encoder weights.
    assert sum(1 for name, _ in model.named_modules() if name.startswith("conv0_0") and name.count(".") == 0) == 1


def test_gradients_reach_every_parameter():
    model = SNUNetCBAM(base_channel=4)
    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    model(a, b).mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    # conv4_0 sees only date B (as in the official code), but it is still trained.
    assert missing == []
