"""Retrieval evaluation: embed every test item once (sharded over ranks), then score in blocks.

Protocol made explicit: which modalities enter the score, one or all captions per video, how many items were
evaluated against the canonical split size. Nothing is skipped silently (see `VideoTextDataset`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Subset

from gram import distributed as dist
from gram.config import EvalConfig
from gram.data.annotations import AnnotationRecord
from gram.data.batch import move_to
from gram.data.dataset import Collator, VideoTextDataset, report_unusable
from gram.data.loader import eval_loader
from gram.eval.metrics import retrieval_metrics
from gram.eval.rerank import rerank_topk
from gram.eval.scoring import retrieval_metrics_from_embeddings, similarity_matrix
from gram.models.gram_model import GramModel

log = logging.getLogger(__name__)

METRIC_KEYS = ("r1", "r5", "r10", "medr", "meanr")


def caption_queries(records: Sequence[AnnotationRecord], protocol: str) -> tuple[list[str], list[int]]:
    """(captions, index of each caption's video): the first caption per video, or all of them."""
    captions, owners = [], []
    for i, record in enumerate(records):
        chosen = record.captions[:1] if protocol == "first" else record.captions
        captions += chosen
        owners += [i] * len(chosen)
    return captions, owners


@torch.no_grad()
def embed_items(model: GramModel, dataset: VideoTextDataset, collate: Collator, modalities: Sequence[str],
                batch_size: int, num_workers: int, device: torch.device, progress: bool = False,
                keep_condition: bool = False, failures: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """{modality: (N, D)} for every item, in dataset order, identical on every rank.

    An item that could not be loaded keeps its place as a row of NaN (see `usable_items`); its id and the
    reason go into ``failures`` (gathered from every rank) when a dict is given.
    With `keep_condition`, also "condition": (N, Lc, H) cross-attention tokens for DAM re-ranking. They are
    large at full size (1000 clips of 8 frames: ~7 GB in fp32), as in the reference.
    """
    from tqdm.auto import tqdm

    parts: dict[str, list[torch.Tensor]] = {m: [] for m in (*modalities, "condition")}
    failed: dict[str, str] = {}
    loader = eval_loader(dataset, collate, batch_size, num_workers)
    width = model.cfg.embed_dim
    bar = tqdm(loader, desc=f"evaluate: embed {len(dataset)} clips", unit="batch", leave=False,
               disable=not (progress and dist.is_main_process()))
    for batch in bar:
        lost = batch.get("failed_items", [])
        failed.update({item_id: reason for _, item_id, reason in lost})
        size, lost_positions = len(batch["ids"]) + len(lost), {position for position, _, _ in lost}
        loaded = [i for i in range(size) if i not in lost_positions]
        rows: dict[str, torch.Tensor] = {}
        if loaded:
            batch = move_to(batch, device)
            tokens = {m: model.encode_tokens(m, batch[m]) for m in modalities}
            rows = {m: model.embed_tokens(m, tokens[m], batch[m]).float() for m in modalities}
            if keep_condition:
                rows["condition"] = model.condition_tokens(tokens, modalities)
        for m in parts:
            if m != "condition" or keep_condition:
                parts[m].append(_in_place(rows.get(m), loaded, size))
    out = {m: dist.all_gather(_concat(p, width, device), with_grad=False) for m, p in parts.items() if m != "condition"}
    if keep_condition:
        out["condition"] = dist.all_gather(_concat(parts["condition"], width, device), with_grad=False)
    if failures is not None:
        for shard in dist.all_gather_object(failed):
            failures.update(shard)
    return out


def _in_place(rows: torch.Tensor | None, loaded: list[int], size: int) -> torch.Tensor | int:
    """(size, ...) rows with the loaded items' rows at their positions and NaN elsewhere; the bare count
    `size` when nothing loaded and the row shape is not known yet (filled in by `_concat`)."""
    if rows is not None and len(loaded) == size:
        return rows
    if rows is None:
        return size
    full = torch.full((size, *rows.shape[1:]), float("nan"), dtype=rows.dtype, device=rows.device)
    full[loaded] = rows
    return full


def _concat(parts: list[torch.Tensor | int], width: int, device: torch.device) -> torch.Tensor:
    """Concatenate batch rows; batches where nothing loaded (ints) become NaN rows shaped like the others."""
    like = next((p for p in parts if isinstance(p, torch.Tensor)), None)
    shape, dtype = (like.shape[1:], like.dtype) if like is not None else ((width,), torch.float32)
    filled = [p if isinstance(p, torch.Tensor) else torch.full((p, *shape), float("nan"), dtype=dtype, device=device)
              for p in parts]
    return torch.cat(filled) if filled else torch.zeros(0, *shape, dtype=dtype, device=device)


def usable_items(dataset, items: dict[str, torch.Tensor], failures: dict[str, str]) -> list[int]:
    """Row indices of the items that can be evaluated; every other one is reported once, all together.

    An item is unusable when it could not be loaded (``failures``: undecodable, truncated) or any of its embeddings
    is not finite (NaN/inf input samples, a diverged model). Without ``eval.allow_missing`` this raises one
    `UnusableItemsError` naming the first ids, their count and the file listing all of them (in the dataset's
    ``report_dir``); with it, they are left out and logged. ``dataset`` is a `VideoTextDataset` (or a `Subset`).
    """
    base, positions = (dataset.dataset, list(dataset.indices)) if isinstance(dataset, Subset) else \
        (dataset, list(range(len(dataset))))
    ids = [base.records[i].video_id for i in positions]
    finite = torch.ones(len(ids), dtype=torch.bool)
    bad_modality: dict[int, str] = {}
    for m, rows in items.items():
        if m == "condition" or rows.ndim != 2:
            continue
        ok = torch.isfinite(rows).all(dim=1).cpu()
        for i in (~ok & finite).nonzero().flatten().tolist():
            bad_modality[i] = m
        finite &= ok
    unusable = {ids[i]: failures.get(ids[i], f"non-finite (NaN/inf) {bad_modality[i]} embedding")
                for i in range(len(ids)) if not finite[i]}
    report_unusable(str(base.split.annotations), unusable, base.report_dir if dist.is_main_process() else None,
                    base.allow_missing)
    return finite.nonzero().flatten().tolist()


@torch.no_grad()
def embed_texts(model: GramModel, collate: Collator, texts: Sequence[str], batch_size: int,
                device: torch.device) -> torch.Tensor:
    """(N, D) text embeddings; each rank embeds a contiguous shard, then all ranks gather."""
    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = -(-len(texts) // world)
    shard = texts[rank * per_rank:(rank + 1) * per_rank]
    out = [model.encode("text", move_to(collate.tokenize(shard[i:i + batch_size], collate.max_text_len), device))
           for i in range(0, len(shard), batch_size)]
    local = torch.cat(out).float() if out else torch.zeros(0, model.cfg.embed_dim, device=device)
    return dist.all_gather(local, with_grad=False)


def scorings(modalities: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
    """Named scorings: the volume over all data modalities, plus cosine for each single pair."""
    rows = {"volume": ("volume", list(modalities))}
    rows.update({f"cosine_{m}": ("cosine", [m]) for m in modalities})
    return rows


@torch.no_grad()
def evaluate_retrieval(model: GramModel, dataset: VideoTextDataset, collate: Collator, cfg: EvalConfig,
                       batch_size: int, num_workers: int, device: torch.device,
                       progress: bool = False) -> dict[str, Any]:
    """Both directions for every scoring. Returns {"scorings": {name: metrics}, protocol fields...}."""
    was_training = model.training
    model.eval()
    modalities = list(cfg.modalities or model.modalities)
    unknown = [m for m in modalities if m not in model.modalities]
    if unknown:
        raise ValueError(f"eval.modalities {unknown} are not modalities of this model ({list(model.modalities)})")
    rerank = cfg.rerank_k > 0 and model.cfg.matching_head
    failures: dict[str, str] = {}
    items = embed_items(model, dataset, collate, modalities, batch_size, num_workers, device, progress,
                        keep_condition=rerank, failures=failures)
    keep = usable_items(dataset, items, failures)  # raises, listing every unusable id, unless eval.allow_missing
    records = [dataset.records[i] for i in keep]
    kept = set(keep)
    left_out = [r.video_id for i, r in enumerate(dataset.records) if i not in kept]
    if left_out:
        items = {m: e[keep] for m, e in items.items()}
    captions, owners = caption_queries(records, cfg.caption_protocol)
    text = embed_texts(model, collate, captions, batch_size, device)
    results = {name: retrieval_metrics_from_embeddings(text, [items[m] for m in mods], owners, kind=kind,
                                                       chunk_size=cfg.chunk_size)
               for name, (kind, mods) in scorings(modalities).items()}
    if rerank:  # a separate row: embedding-only and re-ranked numbers are never mixed
        tokens = collate.tokenize(captions, collate.max_text_len)
        results["volume+dam"] = dam_reranked_metrics(model, text, [items[m] for m in modalities], owners,
                                                     items["condition"], move_to(tokens, device), cfg,
                                                     progress=progress and dist.is_main_process())
    model.train(was_training)
    return {"scorings": results, "modalities": ["text", *modalities], "caption_protocol": cfg.caption_protocol,
            "n_videos": len(records), "n_captions": len(captions), "n_annotated": dataset.num_annotated,
            "canonical_size": dataset.split.canonical_size, "missing_ids": dataset.missing_ids + left_out}


@torch.no_grad()
def dam_reranked_metrics(model: GramModel, text: torch.Tensor, data: list[torch.Tensor], owners: list[int],
                         condition: torch.Tensor, tokens: dict[str, torch.Tensor], cfg: EvalConfig,
                         progress: bool = False) -> dict[str, float]:
    """Both directions after re-ranking each query's top-`rerank_k` volume candidates by the matching head
    (with progress bars when ``progress``).

    text (Nt, D), data [(Nv, D)], condition (Nv, Lc, H), tokens {"input_ids", "attention_mask"}: (Nt, L).
    """
    scores = similarity_matrix(text, data, kind="volume", chunk_size=cfg.chunk_size)  # (Nt, Nv), -volume

    def match_probability(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, v = t.to(condition.device), v.to(condition.device)
        logits = model.match(tokens["input_ids"][t], tokens["attention_mask"][t], condition[v])  # (P, 2)
        return logits.float().softmax(dim=-1)[:, 1]

    bar = "evaluate: DAM re-rank top-{} {}".format
    t2v = rerank_topk(scores, cfg.rerank_k, match_probability, progress=bar(cfg.rerank_k, "t2v") if progress else None)
    v2t = rerank_topk(scores.T, cfg.rerank_k, lambda v, t: match_probability(t, v),
                      progress=bar(cfg.rerank_k, "v2t") if progress else None)
    videos_of_text = [[j] for j in owners]
    texts_of_video = [[] for _ in range(scores.shape[1])]
    for i, j in enumerate(owners):
        texts_of_video[j].append(i)
    out = {f"t2v_{k}": v for k, v in retrieval_metrics(t2v, videos_of_text).items()}
    out.update({f"v2t_{k}": v for k, v in retrieval_metrics(v2t, texts_of_video).items()})
    return out


def warn_if_incomplete(result: dict[str, Any], name: str) -> str | None:
    expected = result.get("canonical_size") or result.get("n_annotated")
    if expected and result["n_videos"] != expected:
        message = (f"{name}: evaluated {result['n_videos']} videos, but the split has {expected}: "
                   f"these metrics are not comparable to published numbers")
        log.warning(message)
        return message
    return None


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one row per dataset and scoring, both directions."""
    header = (f"{'dataset':<14} {'scoring':<14} {'n':>6} | " + " ".join(f"t2v_{k:<5}" for k in METRIC_KEYS)
              + " | " + " ".join(f"v2t_{k:<5}" for k in METRIC_KEYS))
    lines = [header, "-" * len(header)]
    for dataset, result in results.items():
        if "n_classes" in result:  # zero-shot classification
            lines += [f"{dataset:<14} {scoring:<14} {result['n_videos']:>6} | top1 {m['top1']:.2f}  top5 {m['top5']:.2f}"
                      f"  mAP {m['map']:.2f}  ({result['n_classes']} classes)" for scoring, m in result["scorings"].items()]
            continue
        for scoring, m in result["scorings"].items():
            t2v = " ".join(f"{m[f't2v_{k}']:>9.2f}" for k in METRIC_KEYS)
            v2t = " ".join(f"{m[f'v2t_{k}']:>9.2f}" for k in METRIC_KEYS)
            lines.append(f"{dataset:<14} {scoring:<14} {result['n_videos']:>6} | {t2v} | {v2t}")
        paper = result.get("paper")
        if paper:  # the published numbers of this experiment, where the paper gives them
            cells = {d: " ".join(f"{paper[f'{d}_{k}']:>9.2f}" if f"{d}_{k}" in paper else f"{'-':>9}"
                                 for k in METRIC_KEYS) for d in ("t2v", "v2t")}
            lines.append(f"{dataset:<14} {'paper':<14} {'':>6} | {cells['t2v']} | {cells['v2t']}")
    return "\n".join(lines)
