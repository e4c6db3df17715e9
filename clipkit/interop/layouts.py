"""The key tables: clipkit's ``ClipKitModule`` state dict against OpenAI's CLIP layout (which open_clip's built-in
towers keep) and against transformers' ``CLIPModel``. Image towers are timm models, text towers transformers'
``CLIPTextModel``, so clipkit keys are timm's and transformers' own names under the objective's prefixes."""

from __future__ import annotations

from clipkit.interop.keymap import Rule

IMAGE, TEXT = "objective.image_tower.model.", "objective.text_tower.model."
VISUAL, BLOCK = "visual.", "visual.transformer.resblocks.{i}."

# timm VisionTransformer (pre-norm, class token) <-> OpenAI VisionTransformer
OPENAI_VIT = [
    Rule(IMAGE + "patch_embed.proj.weight", VISUAL + "conv1.weight"),
    Rule(IMAGE + "cls_token", VISUAL + "class_embedding"),
    Rule(IMAGE + "pos_embed", VISUAL + "positional_embedding"),
    Rule(IMAGE + "norm_pre.{p}", VISUAL + "ln_pre.{p}"),
    Rule(IMAGE + "blocks.{i}.norm1.{p}", BLOCK + "ln_1.{p}"),
    Rule(IMAGE + "blocks.{i}.attn.qkv.{p}", BLOCK + "attn.in_proj_{p}"),
    Rule(IMAGE + "blocks.{i}.attn.proj.{p}", BLOCK + "attn.out_proj.{p}"),
    Rule(IMAGE + "blocks.{i}.norm2.{p}", BLOCK + "ln_2.{p}"),
    Rule(IMAGE + "blocks.{i}.mlp.fc1.{p}", BLOCK + "mlp.c_fc.{p}"),
    Rule(IMAGE + "blocks.{i}.mlp.fc2.{p}", BLOCK + "mlp.c_proj.{p}"),
    Rule(IMAGE + "norm.{p}", VISUAL + "ln_post.{p}"),
    Rule("objective.image_proj.weight", VISUAL + "proj", transpose=True),
]

# timm resnet50_clip (ByobNet) <-> OpenAI ModifiedResNet; the attention pool's output projection (with a bias) is
# the objective's affine image projection, since the tower ends before it
_BOTTLENECK = [("conv1_1x1.conv.weight", "conv1.weight"), ("conv1_1x1.bn.{p}", "bn1.{p}"),
               ("conv2_kxk.conv.weight", "conv2.weight"), ("conv2_kxk.bn.{p}", "bn2.{p}"),
               ("conv3_1x1.conv.weight", "conv3.weight"), ("conv3_1x1.bn.{p}", "bn3.{p}"),
               ("shortcut.conv.conv.weight", "downsample.0.weight"), ("shortcut.conv.bn.{p}", "downsample.1.{p}")]
OPENAI_RESNET = [
    Rule(IMAGE + "stem.conv{n}.conv.weight", VISUAL + "conv{n}.weight"),
    Rule(IMAGE + "stem.conv{n}.bn.{p}", VISUAL + "bn{n}.{p}"),
    *[Rule(f"{IMAGE}stages.{s - 1}.{{j}}.{ours}", f"{VISUAL}layer{s}.{{j}}.{theirs}")
      for s in range(1, 5) for ours, theirs in _BOTTLENECK],
    Rule(IMAGE + "head.pos_embed", VISUAL + "attnpool.positional_embedding"),
    *[Rule(f"{IMAGE}head.{x}.{{p}}", f"{VISUAL}attnpool.{x}_proj.{{p}}") for x in "qkv"],
    Rule("objective.image_proj.{p}", VISUAL + "attnpool.c_proj.{p}"),
]

# transformers CLIPTextModel <-> OpenAI's text transformer, and the joint parts
_LAYER = "transformer.resblocks.{i}."
OPENAI_TEXT = [
    Rule(TEXT + "embeddings.token_embedding.weight", "token_embedding.weight"),
    Rule(TEXT + "embeddings.position_embedding.weight", "positional_embedding"),
    Rule(TEXT + "encoder.layers.{i}.self_attn.{qkv}_proj.{p}", _LAYER + "attn.in_proj_{p}"),
    Rule(TEXT + "encoder.layers.{i}.self_attn.out_proj.{p}", _LAYER + "attn.out_proj.{p}"),
    Rule(TEXT + "encoder.layers.{i}.layer_norm1.{p}", _LAYER + "ln_1.{p}"),
    Rule(TEXT + "encoder.layers.{i}.layer_norm2.{p}", _LAYER + "ln_2.{p}"),
    Rule(TEXT + "encoder.layers.{i}.mlp.fc1.{p}", _LAYER + "mlp.c_fc.{p}"),
    Rule(TEXT + "encoder.layers.{i}.mlp.fc2.{p}", _LAYER + "mlp.c_proj.{p}"),
    Rule(TEXT + "final_layer_norm.{p}", "ln_final.{p}"),
    Rule("objective.text_proj.weight", "text_projection", transpose=True),
    Rule("objective.logit_scale", "logit_scale"),
]

# timm VisionTransformer <-> transformers CLIPVisionModel (inside CLIPModel)
_HF_LAYER = "vision_model.encoder.layers.{i}."
HF_VISION = [
    Rule(IMAGE + "patch_embed.proj.weight", "vision_model.embeddings.patch_embedding.weight"),
    Rule(IMAGE + "cls_token", "vision_model.embeddings.class_embedding"),
    Rule(IMAGE + "pos_embed", "vision_model.embeddings.position_embedding.weight"),
    Rule(IMAGE + "norm_pre.{p}", "vision_model.pre_layrnorm.{p}"),
    Rule(IMAGE + "blocks.{i}.norm1.{p}", _HF_LAYER + "layer_norm1.{p}"),
    Rule(IMAGE + "blocks.{i}.attn.qkv.{p}", _HF_LAYER + "self_attn.{qkv}_proj.{p}"),
    Rule(IMAGE + "blocks.{i}.attn.proj.{p}", _HF_LAYER + "self_attn.out_proj.{p}"),
    Rule(IMAGE + "blocks.{i}.norm2.{p}", _HF_LAYER + "layer_norm2.{p}"),
    Rule(IMAGE + "blocks.{i}.mlp.{rest}", _HF_LAYER + "mlp.{rest}"),
    Rule(IMAGE + "norm.{p}", "vision_model.post_layernorm.{p}"),
    Rule("objective.image_proj.weight", "visual_projection.weight"),
]
HF_TEXT = [
    Rule(TEXT + "{rest}", "text_model.{rest}"),  # the text tower is a CLIPTextModel (transformers 5: no prefix)
    Rule("objective.text_proj.weight", "text_projection.weight"),
    Rule("objective.logit_scale", "logit_scale"),
]
