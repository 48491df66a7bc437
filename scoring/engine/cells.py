"""Cell lists: the coreset's map values brought close to the whole bank's, at a few percent of its cost.

A coreset row's distance to a patch is an upper bound of the patch's distance to the whole bank:
certification makes the *image score* exact by re-searching the patches it depends on, but the
other cells of the map keep their bounds, and on normal texture a bound sits above the exact value
by about the coreset's spacing. Ranked over a test set's pixels those inflated normal cells cost
0.35 (toothbrush) to 0.7 (KolektorSDD) points of pixel AUROC against the whole bank (docs/speed.md).

Each coreset row stands for the rows of the whole bank nearest to it (its *cell*: every row of
the whole bank belongs to its nearest coreset row). :func:`in_cell_order` orders the whole bank cell
by cell, each cell's rows nearest to its coreset row first, and notes where each cell starts. A
patch's value is then the smaller of its coreset distance and its distances to the ``cells``
rows from its nearest coreset row's start (:func:`tightened`: that cell's rows,
and past a small cell the next cells' rows): still the distance to a real row of the bank, so
still an upper bound (the certification's reasoning is unchanged), and the exact distance
whenever the patch's nearest row is among them and found. Per patch that is ``cells`` rows that lie
together in memory, not a search: in a projected bank (wide features) each ranked by its first-pass
projection (34 or 66 floats), a lower bound of its distance, and only the lowest
:data:`.knn.WINDOW_EXACT_ROWS` measured exactly (the nearest listed row is nearly always among them:
the maps of the development sets' detectors were unchanged to 4 decimals); else every row by products.

A setting (``ScoreConfig.cells``, ``--cells N``: rows read per patch, 0 = off, the default;
``--recipe best``: :data:`LIST_ROWS`), since the bank's first build searches every whole-bank row
in the coreset (KolektorSDD +12 s, Magnetic Tile +100 s). At scoring it costs little: a few ms per
test image, and the certification, whose bounds are tighter, re-searches half as many patches.
A square view's bank (:mod:`.views`) reads its cells too: only its image scores are kept, but
its certification re-searches fewer patches (docs/speed.md "Cells in the square view's bank").
Only for ``k = 1`` (the k-th nearest of a list and of the coreset together would count shared rows
twice) and for a bank held whole in one process (a sharded bank's cells span the processes);
elsewhere the setting changes nothing.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from .knn import BankSearch

LIST_ROWS = 64  # the recipe's rows per patch (toothbrush pixel AUROC: 8 rows 0.9671, 32 0.9683, 64 0.9691, all 0.9698)
ASSIGN_ROWS = 16384  # whole-bank rows placed in their cells per search (a progress bar step)


def in_cell_order(coreset: BankSearch, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The coreset's search and the ``(B, D)`` whole bank -> the same rows ``(B, D)`` cell by cell (every
    row is in the cell of its nearest coreset row, found by the exact search), each cell's rows
    nearest to its coreset row first, and ``(C,)`` where each cell starts in them."""
    found, owner = [], []
    for start in tqdm(range(0, full.shape[0], ASSIGN_ROWS), desc="cell lists", unit="block", leave=False,
                      disable=full.shape[0] <= 4 * ASSIGN_ROWS, dynamic_ncols=True):
        distance, row = coreset.nearest(full[start:start + ASSIGN_ROWS], 1)
        found.append(distance[:, 0].cpu())
        owner.append(row[:, 0].cpu())
    distance, owner = torch.cat(found), torch.cat(owner)
    order = distance.argsort(stable=True)  # by distance, then (stable) by cell
    order = order[owner[order].argsort(stable=True)]
    sizes = torch.bincount(owner, minlength=coreset.size)
    return full[order].contiguous(), sizes.cumsum(0) - sizes


def tightened(coreset: BankSearch, whole: BankSearch, starts: torch.Tensor, patches: torch.Tensor,
              width: int = LIST_ROWS) -> torch.Tensor:
    """``(M, D)`` patches -> ``(M,)`` the smaller of each patch's nearest coreset distance and its
    distance to the nearest of the ``width`` whole-bank rows from that coreset row's cell start
    (``whole`` in :func:`in_cell_order`'s order, ``starts`` its cell starts): an upper bound of its
    distance to the whole bank, equal to it where the nearest row is among them."""
    distance, row = coreset.nearest(patches, 1)
    window = torch.arange(width, device=row.device)
    rows = (starts.to(row.device)[row[:, 0]][:, None] + window).clamp_max(whole.size - 1)
    return torch.minimum(distance[:, 0], whole.nearest_among(patches, rows, width).to(distance.dtype))
