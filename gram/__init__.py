"""GRAM: Gramian multimodal representation learning and alignment.

Public API:
    volume(anchor, *data)            the k-volume spanned by an anchor and k-1 data embeddings (gram.losses)
    GramModel, ModelConfig           the model and its config (gram.models, gram.config)
    build_loss, LossConfig           the contrastive objective and its baselines
    retrieval_metrics(scores, tgt)   R@1/5/10, MedR, MeanR with pessimistic ties (gram.eval)
    read_annotations(path)           GRAM/VAST annotation files (gram.data)
    load_model(path, device)         a model with its vocabulary and test-time preprocessing, from a checkpoint,
                                     run, hub or released GRAM folder (gram.inference)
    list_pretrained()                names of the released GRAM checkpoints and encoder weights (gram.pretrained)
"""

from gram.config import GramConfig, ModelConfig
from gram.data.annotations import read_annotations
from gram.eval.metrics import retrieval_metrics
from gram.inference import GramPredictor, load_model
from gram.losses import LossConfig, build_loss, volume
from gram.models.gram_model import GramModel
from gram.pretrained import list_pretrained

__version__ = "0.1.0"

__all__ = ["GramConfig", "GramModel", "GramPredictor", "list_pretrained", "load_model", "LossConfig", "ModelConfig", "build_loss", "read_annotations",
           "retrieval_metrics", "volume", "__version__"]
