"""The contrastive loss is CLIP's: it matches open_clip's ClipLoss, and the temperature obeys the paper."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from clipkit.objectives import contrastive_loss


@pytest.mark.parametrize("batch,dim,scale", [(8, 16, 1 / 0.07), (64, 128, 100.0), (3, 5, 1.0)])
def test_loss_and_gradients_equal_open_clip(batch, dim, scale):
    torch.manual_seed(batch)
    image = F.normalize(torch.randn(batch, dim, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, dtype=torch.float64), dim=-1).requires_grad_()
    logit_scale = torch.tensor(scale, dtype=torch.float64)

    ours = contrastive_loss(image, text, logit_scale)
    ours_grads = torch.autograd.grad(ours, (image, text))
    theirs = ClipLoss()(image, text, logit_scale)
    theirs_grads = torch.autograd.grad(theirs, (image, text))

    assert abs(ours.item() - theirs.item()) < 1e-6
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_perfectly_aligned_pairs_have_near_zero_loss():
    features = torch.eye(4)
    assert contrastive_loss(features, features, torch.tensor(100.0)).item() < 1e-6
    assert contrastive_loss(features, features.roll(1, 0), torch.tensor(100.0)).item() > 50


def test_local_loss_uses_rank_offset_labels():
    """Rank r's rows are scored against the gathered batch with positives at r * B + i."""
    torch.manual_seed(0)
    img, txt = (F.normalize(torch.randn(8, 6), dim=-1) for _ in range(2))
    full = contrastive_loss(img, txt, torch.tensor(10.0))
    shards = [contrastive_loss(img[r * 4:(r + 1) * 4], txt[r * 4:(r + 1) * 4], torch.tensor(10.0),
                               all_image=img, all_text=txt, rank=r) for r in range(2)]
    assert torch.allclose(full, sum(shards) / 2, atol=1e-6)


def test_temperature_is_initialised_to_0_07(tiny_cfg):
    from hydra.utils import instantiate

    objective = instantiate(tiny_cfg().objective)
    assert objective.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert objective.logit_scale.exp().item() == pytest.approx(1 / 0.07)
