"""Training objectives. Each owns the towers it needs and answers the same two questions:
``loss(batch)`` for training and ``zero_shot_logits(images, prompts)`` for evaluation, so callbacks
and comparisons never branch on which objective a run used."""

from clipkit.objectives.base import Objective
from clipkit.objectives.bow_prediction import BagOfWordsPrediction, bag_of_words
from clipkit.objectives.caption import CaptionLM
from clipkit.objectives.contrastive import Contrastive, contrastive_loss
from clipkit.objectives.finetune import FinetuneClassifier
from clipkit.objectives.supervised import Supervised

__all__ = ["BagOfWordsPrediction", "CaptionLM", "Contrastive", "FinetuneClassifier", "Objective", "Supervised", "bag_of_words",
           "contrastive_loss"]
