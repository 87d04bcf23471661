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

The names are imported on first use (PEP 562), so `import gram.cli` (every script's entry point) does not pull in
torch and transformers before a script has parsed its arguments: `--help` answers at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gram._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "GramConfig": "gram.config",
    "ModelConfig": "gram.config",
    "read_annotations": "gram.data.annotations",
    "retrieval_metrics": "gram.eval.metrics",
    "GramPredictor": "gram.inference",
    "load_model": "gram.inference",
    "LossConfig": "gram.losses",
    "build_loss": "gram.losses",
    "volume": "gram.losses",
    "GramModel": "gram.models.gram_model",
    "list_pretrained": "gram.pretrained",
}

__all__ = ["GramConfig", "GramModel", "GramPredictor", "LossConfig", "ModelConfig", "build_loss", "list_pretrained",
           "load_model", "read_annotations", "retrieval_metrics", "volume", "__version__"]


assert set(__all__) == {*_EXPORTS, "__version__"}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from gram.config import GramConfig, ModelConfig
    from gram.data.annotations import read_annotations
    from gram.eval.metrics import retrieval_metrics
    from gram.inference import GramPredictor, load_model
    from gram.losses import LossConfig, build_loss, volume
    from gram.models.gram_model import GramModel
    from gram.pretrained import list_pretrained
