"""Zero-shot audio-video classification: score a prompt per class name against each clip.

The class prompt is the anchor and the clip's modalities are the data vectors, so the same volume (and, for
comparison, cosine) scoring as retrieval ranks the classes of each clip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gram.config import EvalConfig
from gram.data.dataset import Collator, VideoTextDataset
from gram.eval.metrics import classification_metrics
from gram.eval.retrieval import embed_items, embed_texts, usable_items
from gram.eval.scoring import similarity_matrix
from gram.models.gram_model import GramModel


def clip_labels(dataset: VideoTextDataset, field: str, classes: Sequence[str],
                keep: Sequence[int] | None = None) -> list[list[int]]:
    """Class indices of every clip (or of the clips at ``keep``); a label may be one name or a list of names
    (multi-label sets)."""
    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for record in (dataset.records if keep is None else [dataset.records[i] for i in keep]):
        value = record.extra.get(field)
        names = value if isinstance(value, list) else [value]
        unknown = [n for n in names if n not in index]
        if value is None or unknown:
            raise ValueError(f"{dataset.split.annotations}: clip {record.video_id} has label {value!r}, which is not "
                             f"in eval.classes ({len(classes)} names); fix the class list or the `{field}` field")
        labels.append([index[n] for n in names])
    return labels


@torch.no_grad()
def evaluate_classification(model: GramModel, dataset: VideoTextDataset, collate: Collator, cfg: EvalConfig,
                            batch_size: int, num_workers: int, device: torch.device,
                            progress: bool = False) -> dict[str, Any]:
    """Top-1/top-5 accuracy and mAP (percent) by volume and by cosine per modality."""
    if not cfg.classes:
        raise ValueError("eval.task=classification needs eval.classes (the class names)")
    was_training = model.training
    model.eval()
    modalities = list(cfg.modalities or model.modalities)
    failures: dict[str, str] = {}
    items = embed_items(model, dataset, collate, modalities, batch_size, num_workers, device, progress,
                        failures=failures)
    keep = usable_items(dataset, items, failures)  # raises, listing every unusable id, unless eval.allow_missing
    items = {m: e[keep] for m, e in items.items()}
    prompts = embed_texts(model, collate, [cfg.prompt.format(label=c) for c in cfg.classes], batch_size, device)
    labels = clip_labels(dataset, cfg.label_field, cfg.classes, keep)
    single = all(len(ls) == 1 for ls in labels)
    targets = [ls[0] for ls in labels] if single else labels
    rows = {"volume": similarity_matrix(prompts, [items[m] for m in modalities], kind="volume").T}  # (N, C)
    rows.update({f"cosine_{m}": similarity_matrix(prompts, [items[m]], kind="cosine").T for m in modalities})
    model.train(was_training)
    return {"scorings": {name: classification_metrics(scores, targets) for name, scores in rows.items()},
            "n_videos": len(keep), "n_classes": len(cfg.classes), "prompt": cfg.prompt}
