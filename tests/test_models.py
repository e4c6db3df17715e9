"""Towers: any timm model by name with kwargs passed through; text pooled at the end-of-text token."""

import pytest
import torch
from transformers import CLIPTextConfig

from clipkit.models import ImageTower, TextTower


def test_timm_kwargs_pass_through_and_features_are_pooled():
    tower = ImageTower("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    assert tower.model.patch_embed.num_patches == 16
    assert tower(torch.randn(2, 3, 32, 32)).shape == (2, tower.width) == (2, 192)


def test_other_timm_families_work_unchanged():
    tower = ImageTower("resnet18")
    assert tower(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_unknown_backbone_names_the_nearest_one():
    with pytest.raises(ValueError, match="unknown image backbone 'vit_tiy_patch16_224': did you mean vit_tiny_patch16_224"):
        ImageTower("vit_tiy_patch16_224")


def _text_tower(pooling="eos"):
    config = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=10, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2)
    return TextTower(config, pooling=pooling).eval()


def test_eos_pooling_reads_the_last_real_token_not_position_0():
    tower = _text_tower()
    ids = torch.tensor([[1, 7, 8, 2, 0, 0], [1, 9, 2, 0, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[4], [3]])).long()
    with torch.no_grad():
        pooled = tower(ids, mask)
        hidden = tower.model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(pooled[0], hidden[0, 3]) and torch.allclose(pooled[1], hidden[1, 2])
        # changing an early token changes the pooled feature (it is not read at position 0 only)
        other = tower(torch.tensor([[1, 30, 8, 2, 0, 0], [1, 9, 2, 0, 0, 0]]), mask)
        assert not torch.allclose(other[0], pooled[0]) and torch.allclose(other[1], pooled[1])


def test_text_attention_is_causal():
    """The paper's text tower uses masked self-attention: a later token cannot change an earlier state."""
    tower = _text_tower()
    mask = torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        a = tower.model(input_ids=torch.tensor([[1, 5, 6, 7, 2]]), attention_mask=mask).last_hidden_state
        b = tower.model(input_ids=torch.tensor([[1, 5, 6, 40, 2]]), attention_mask=mask).last_hidden_state
    assert torch.allclose(a[0, :3], b[0, :3], atol=1e-6) and not torch.allclose(a[0, 3], b[0, 3])


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="unknown text pooling 'last'"):
        _text_tower("last")


def test_clip_resnet_preset_family_matches_open_clip_modified_resnet_weight_for_weight():
    """timm's resnet50_clip (model/image=resnet_clip_tiny) is the paper's modified ResNet: open_clip's
    ModifiedResNet at the same width, its weights renamed by timm's OpenAI converter, gives the same features."""
    from open_clip.modified_resnet import ModifiedResNet
    from timm.models.byobnet import ByoBlockCfg, checkpoint_filter_fn

    torch.manual_seed(0)
    reference = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=24, heads=8, image_size=64, width=16).eval()
    blocks = [ByoBlockCfg(type="bottle", d=1, c=c, s=s, br=0.25) for c, s in ((64, 1), (128, 2), (256, 2), (512, 2))]
    tower = ImageTower("resnet50_clip", img_size=64, stem_chs=(8, 8, 16), blocks=blocks)
    ours = tower.model.eval()
    ours.reset_classifier(24)  # open_clip's attention pool ends in its output projection; the tower's ends before it
    state = checkpoint_filter_fn({f"visual.{k}": v for k, v in reference.state_dict().items()}, ours)
    ours.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)
    assert tower.width == 512 and tower.tokens(x).shape == (2, 4, 512)  # 64 px / 32 = a 2x2 map


def test_tiny_clip_resnet_preset_builds_and_exposes_its_map():
    from hydra.utils import instantiate

    from clipkit.config import compose_config

    cfg = compose_config(["model/image=resnet_clip_tiny", "data.image_size=32"])
    tower = instantiate(cfg.model.image)
    x = torch.randn(2, 3, 32, 32)
    assert tower(x).shape == (2, tower.width) == (2, 512)
    assert tower.tokens(x).shape == (2, 4, 512)  # 32 px at stride 16
