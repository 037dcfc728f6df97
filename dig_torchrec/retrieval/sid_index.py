"""The SID index: every item's Semantic ID, the SID -> items inverted index and the
valid-prefix sets that constrain beam search (paper §3.4, "candidates are recovered from
the SID-to-item inverted index built offline").

A prefix ``(s_1, ..., s_l)`` is stored as one int64 *prefix code*
``code_l = sum_i s_i * K^(l - i)`` (base-K digits, most significant first), so the valid
prefixes of depth ``l`` are one sorted tensor and a membership test is a
``torch.searchsorted``. The child of ``code_l`` by token ``k`` is ``code_l * K + k``.
K^L must fit in int64 (K=256, L=4 gives 2^32).

On disk (next to the checkpoint, ``CKPT/sid_index/``)::

    sid_table.parquet        item_id, s_1..s_L, leaf_code        (one row per item)
    inverted_index.parquet   leaf_code, s_1..s_L, items list<int64> (one row per occupied leaf)
    prefixes.parquet         depth, code, num_items            (valid prefixes, every depth)
    index.json               num_layers, num_codes, num_items, collision statistics
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dig_torchrec.errors import CheckpointError
from dig_torchrec.modules.prefix_sampler import encode_prefix

if TYPE_CHECKING:  # pragma: no cover
    from dig_torchrec.data.items import ItemTable

logger = logging.getLogger(__name__)

SID_INDEX_DIR = "sid_index"
_FILES = ("sid_table.parquet", "inverted_index.parquet", "prefixes.parquet", "index.json")


def decode_prefix(codes: torch.Tensor, depth: int, num_codes: int) -> torch.Tensor:
    """Prefix codes ``[...]`` -> tokens ``[..., depth]`` (inverse of :func:`encode_prefix`).

    Args:
        codes: int64 prefix codes of depth ``depth``.
        depth: l.
        num_codes: K.
    """
    out = torch.empty((*codes.shape, depth), dtype=torch.long, device=codes.device)
    rest = codes.long()
    for i in range(depth - 1, -1, -1):
        out[..., i] = rest % num_codes
        rest = rest // num_codes
    return out


def sorted_membership(sorted_codes: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Boolean mask: which ``query`` codes occur in the sorted 1-D ``sorted_codes``.

    Args:
        sorted_codes: ascending unique int64 codes.
        query: int64 codes of any shape.
    """
    if sorted_codes.numel() == 0:
        return torch.zeros_like(query, dtype=torch.bool)
    pos = torch.searchsorted(sorted_codes, query).clamp_(max=sorted_codes.numel() - 1)
    return sorted_codes[pos] == query


@dataclass
class CollisionStats:
    """How many items share a full SID (a leaf)."""

    num_items: int
    occupied_leaves: int
    mean_items_per_leaf: float
    max_items_per_leaf: int
    colliding_item_fraction: float  # fraction of items whose leaf holds >= 2 items
    collision_rate: float  # 1 - occupied_leaves / num_items: items beyond the first per leaf

    def to_dict(self) -> Dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class SidIndex:
    """Item SIDs, the inverted index and the valid-prefix sets.

    Args:
        item_sids: ``[num_items, L]`` int64 tokens; row ``v`` is item ``v``'s SID.
        num_codes: K, the codebook size of every layer.
    """

    def __init__(self, item_sids: torch.Tensor, num_codes: int) -> None:
        item_sids = item_sids.detach().cpu().long()
        if item_sids.dim() != 2 or item_sids.shape[0] == 0:
            raise CheckpointError(f"SID table must be [num_items, L] with num_items > 0, got shape {tuple(item_sids.shape)}")
        bad = (item_sids < 0) | (item_sids >= num_codes)
        if bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0, 0])
            raise CheckpointError(
                f"SID table: item {row} has SID {item_sids[row].tolist()} outside [0, {num_codes}) "
                f"(unassigned items? was the tokenizer initialized before the checkpoint?)"
            )
        self.num_codes = int(num_codes)
        self.num_layers = int(item_sids.shape[1])
        if self.num_codes ** self.num_layers >= 2**62:
            raise CheckpointError(f"K^L = {num_codes}^{self.num_layers} does not fit an int64 prefix code")
        self.item_sids = item_sids
        self.num_items = int(item_sids.shape[0])
        # prefix_codes[l-1]: sorted unique codes of every occupied depth-l prefix.
        self.prefix_codes: List[torch.Tensor] = []
        self.prefix_counts: List[torch.Tensor] = []
        for depth in range(1, self.num_layers + 1):
            codes, counts = torch.unique(encode_prefix(item_sids[:, :depth], self.num_codes), sorted=True, return_counts=True)
            self.prefix_codes.append(codes)
            self.prefix_counts.append(counts)
        self.item_leaf_code = encode_prefix(item_sids, self.num_codes)  # [num_items]
        # Inverted index in CSR form: leaf_codes[j]'s items are leaf_items[leaf_offsets[j]:leaf_offsets[j+1]],
        # ascending item id inside a leaf (stable sort of the item ids by leaf code).
        self.leaf_codes = self.prefix_codes[-1]
        order = torch.sort(self.item_leaf_code, stable=True).indices
        self.leaf_items = order  # item ids grouped by leaf
        self.leaf_sizes = self.prefix_counts[-1]
        self.leaf_offsets = torch.zeros(self.leaf_codes.numel() + 1, dtype=torch.long)
        self.leaf_offsets[1:] = torch.cumsum(self.leaf_sizes, 0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, model: torch.nn.Module, items: "ItemTable", batch_size: int = 4096) -> "SidIndex":
        """Assign every item its SID with the model's tokenizer (Eq. 1-3 plus the configured
        collision resolution) and index them.

        Args:
            model: a ``DIGModel`` in eval mode.
            items: the full item table.
            batch_size: items per encoder call.
        """
        with torch.no_grad():
            sids = model.full_corpus_sids(items, batch_size=batch_size)
        index = cls(sids, model.cfg.tokenizer.num_codes)
        stats = index.collision_stats()
        logger.info(
            "SID index: %d items in %d leaves (mean %.3f, max %d items per leaf; %.2f%% of items share a leaf)",
            stats.num_items, stats.occupied_leaves, stats.mean_items_per_leaf, stats.max_items_per_leaf,
            100.0 * stats.colliding_item_fraction,
        )
        return index

    # ------------------------------------------------------------------ queries
    def valid_codes(self, depth: int) -> torch.Tensor:
        """Sorted codes of the occupied prefixes of ``depth`` (1..L)."""
        return self.prefix_codes[depth - 1]

    def is_valid(self, codes: torch.Tensor, depth: int) -> torch.Tensor:
        """Mask of the ``codes`` (depth ``depth``) that prefix at least one item."""
        return sorted_membership(self.prefix_codes[depth - 1], codes)

    def leaf_index(self, leaf_codes: torch.Tensor) -> torch.Tensor:
        """Position of each leaf code in :attr:`leaf_codes`; -1 for codes that hold no item."""
        if leaf_codes.numel() == 0:
            return leaf_codes.clone()
        pos = torch.searchsorted(self.leaf_codes, leaf_codes).clamp_(max=self.leaf_codes.numel() - 1)
        return torch.where(self.leaf_codes[pos] == leaf_codes, pos, torch.full_like(pos, -1))

    def collision_stats(self) -> CollisionStats:
        sizes = self.leaf_sizes
        occupied = int(sizes.numel())
        return CollisionStats(
            num_items=self.num_items,
            occupied_leaves=occupied,
            mean_items_per_leaf=float(self.num_items / occupied),
            max_items_per_leaf=int(sizes.max()),
            colliding_item_fraction=float(sizes[sizes > 1].sum()) / self.num_items,
            collision_rate=1.0 - occupied / self.num_items,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write the three parquet files and ``index.json`` into ``directory`` (atomic rename).

        Args:
            directory: target folder, e.g. ``CKPT/sid_index``.
        """
        out = Path(directory)
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            for f in tmp.iterdir():
                f.unlink()
        tmp.mkdir(parents=True, exist_ok=True)
        L = self.num_layers
        sid_cols = {f"s_{i + 1}": pa.array(self.item_sids[:, i].numpy()) for i in range(L)}
        pq.write_table(
            pa.table({"item_id": pa.array(torch.arange(self.num_items).numpy()), **sid_cols,
                      "leaf_code": pa.array(self.item_leaf_code.numpy())}),
            tmp / "sid_table.parquet",
        )
        leaf_tokens = decode_prefix(self.leaf_codes, L, self.num_codes)
        items_list = pa.ListArray.from_arrays(pa.array(self.leaf_offsets.numpy()), pa.array(self.leaf_items.numpy()))
        pq.write_table(
            pa.table({"leaf_code": pa.array(self.leaf_codes.numpy()),
                      **{f"s_{i + 1}": pa.array(leaf_tokens[:, i].numpy()) for i in range(L)},
                      "items": items_list}),
            tmp / "inverted_index.parquet",
        )
        depth = torch.cat([torch.full_like(c, d + 1) for d, c in enumerate(self.prefix_codes)])
        pq.write_table(
            pa.table({"depth": pa.array(depth.numpy()), "code": pa.array(torch.cat(self.prefix_codes).numpy()),
                      "num_items": pa.array(torch.cat(self.prefix_counts).numpy())}),
            tmp / "prefixes.parquet",
        )
        (tmp / "index.json").write_text(json.dumps(
            {"num_layers": L, "num_codes": self.num_codes, "num_items": self.num_items,
             "collisions": self.collision_stats().to_dict()}, indent=2))
        if out.exists():
            for f in out.iterdir():
                f.unlink()
            out.rmdir()
        tmp.rename(out)
        logger.info("wrote SID index to %s", out)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> "SidIndex":
        """Read an index written by :meth:`save` (the SID table is the source of truth;
        the inverted index and prefixes are rebuilt from it and cross-checked).

        Args:
            directory: folder holding ``sid_table.parquet`` and ``index.json``.
        """
        d = Path(directory)
        for name in _FILES:
            if not (d / name).exists():
                raise CheckpointError(f"{d / name}: SID index file missing (rebuild with `dig eval --rebuild-index`)")
        info = json.loads((d / "index.json").read_text())
        table = pq.read_table(d / "sid_table.parquet")
        L = int(info["num_layers"])
        cols = [f"s_{i + 1}" for i in range(L)]
        missing = [c for c in ["item_id", *cols] if c not in table.column_names]
        if missing:
            raise CheckpointError(f"{d / 'sid_table.parquet'}: missing columns {missing}")
        item_id = torch.from_numpy(table.column("item_id").to_numpy().copy())
        if not torch.equal(item_id, torch.arange(item_id.numel())):
            raise CheckpointError(f"{d / 'sid_table.parquet'}: column item_id must be 0..num_items-1 in order")
        sids = torch.stack([torch.from_numpy(table.column(c).to_numpy().copy()) for c in cols], dim=1)
        index = cls(sids, int(info["num_codes"]))
        inv = pq.read_table(d / "inverted_index.parquet", columns=["leaf_code"])
        if not torch.equal(torch.from_numpy(inv.column("leaf_code").to_numpy().copy()), index.leaf_codes):
            raise CheckpointError(f"{d / 'inverted_index.parquet'}: leaf codes disagree with sid_table.parquet")
        return index

    @staticmethod
    def default_dir(checkpoint_dir: str | Path) -> Path:
        return Path(checkpoint_dir) / SID_INDEX_DIR

    @classmethod
    def load_or_build(
        cls, checkpoint_dir: str | Path, model: torch.nn.Module, items: "ItemTable", rebuild: bool = False,
        save: bool = True,
    ) -> "SidIndex":
        """Load ``CKPT/sid_index`` if present and consistent with the model, else build it.

        A freshly built index is saved only where none exists (a cache beside a training
        checkpoint); an existing ``sid_index/`` is never overwritten.

        Args:
            checkpoint_dir: the checkpoint (or export bundle) directory.
            model: the loaded model, used to build the index when needed.
            items: the item table.
            rebuild: ignore a saved index.
            save: write a freshly built index next to the checkpoint when it has none (skipped if
                not writable).
        """
        d = cls.default_dir(checkpoint_dir)
        if d.exists() and not rebuild:
            try:
                index = cls.load(d)
            except CheckpointError as e:
                logger.warning("ignoring saved SID index: %s", e)
            else:
                if index.num_items == items.num_items and index.num_codes == model.cfg.tokenizer.num_codes \
                        and index.num_layers == model.cfg.tokenizer.num_layers:
                    logger.info("loaded SID index from %s", d)
                    return index
                logger.warning("saved SID index at %s does not match the model/item table; rebuilding it in memory", d)
        index = cls.build(model, items)
        if d.exists():  # never rewrite what a checkpoint or bundle holds
            logger.info("rebuilt the SID index in memory; %s is left as it is", d)
        elif save:
            try:
                index.save(d)
            except OSError as e:  # read-only checkpoint: keep the in-memory index
                logger.warning("could not write SID index to %s: %s", d, e)
        return index

    def items_of(self, leaf_code: int) -> List[int]:
        """Items of one leaf (convenience for inspection; not used on hot paths)."""
        j = int(self.leaf_index(torch.tensor([leaf_code]))[0])
        if j < 0:
            return []
        return self.leaf_items[self.leaf_offsets[j]:self.leaf_offsets[j + 1]].tolist()


def maybe_load(directory: Optional[str | Path]) -> Optional[SidIndex]:
    """Load a SID index if ``directory`` holds one, else ``None``."""
    if directory is None or not (Path(directory) / "sid_table.parquet").exists():
        return None
    return SidIndex.load(directory)
