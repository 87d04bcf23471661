"""Evaluation: retrieval metrics, chunked scoring, DAM re-ranking, zero-shot classification, geometry."""

from gram.eval.metrics import classification_metrics, retrieval_metrics, target_ranks
from gram.eval.rerank import rerank_topk
from gram.eval.scoring import retrieval_metrics_from_embeddings, similarity_matrix

__all__ = ["classification_metrics", "rerank_topk", "retrieval_metrics", "retrieval_metrics_from_embeddings",
           "similarity_matrix", "target_ranks"]
