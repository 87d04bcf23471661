"""The reference's (N1, N2, k, k) Gram tensor (spec §3), shared by the loss and evaluation benches."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def reference_gram(anchor: torch.Tensor, data: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N1, N2, k, k) Gram tensor built as the reference does: anchor-data entries from matmuls, the
    anchor's and each sample's own dot products row-wise, expanded over the other side.

    anchor (N1, d); data: k - 1 tensors (N2, d), row j of each belonging to sample j.
    """
    n1, n2 = anchor.shape[0], data[0].shape[0]
    vectors = [anchor, *data]
    rows = []
    for p, u in enumerate(vectors):
        row = []
        for q, v in enumerate(vectors):
            if p == 0 and q == 0:
                entry = (u * u).sum(-1, keepdim=True).expand(n1, n2)  # (N1, N2)
            elif p == 0 or q == 0:
                entry = anchor @ (v if p == 0 else u).T  # (N1, d) @ (d, N2) -> (N1, N2)
            else:
                entry = (u * v).sum(-1).unsqueeze(0).expand(n1, n2)  # per-sample (1, N2) -> (N1, N2)
            row.append(entry)
        rows.append(torch.stack(row, dim=-1))  # (N1, N2, k)
    return torch.stack(rows, dim=-2)  # (N1, N2, k, k)
