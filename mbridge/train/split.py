"""How ``data.split`` divides an indexed dataset's documents into train, validation and test,
exactly as Megatron-Core's dataset builder rounds it, and which splits a run can leave out.

Megatron-Core gives split ``i`` documents ``round(lo_i * N) .. round(hi_i * N)`` of ``N``
(``blended_megatron_dataset_config.py`` ``parse_and_normalize_split`` and
``convert_split_vector_to_split_matrix``, the bounds rounded in
``blended_megatron_dataset_builder.py``). A split with a share but no documents makes its
``GPTDataset._get_num_epochs`` loop forever looking for tokens (400 documents with the
default ``969,30,1`` give the test split none), so the plan finds it first.

    split_documents("969,30,1", 400) -> (388, 12, 0)
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mbridge.train.config import ConfigError

TRAIN, VALID, TEST = 0, 1, 2
NAMES = ("train", "validation", "test")


def split_shares(split: str) -> tuple[float, float, float]:
    """``"969,30,1"`` -> ``(0.969, 0.03, 0.001)``: Megatron-Core's parse (any separator, up to
    three numbers, missing ones 0) and normalisation."""
    numbers = [float(x) for x in re.findall(r"[.0-9]+", split)]
    if not 1 <= len(numbers) <= 3 or sum(numbers) <= 0:
        raise ConfigError(f"data.split={split!r} is not up to three shares for train, "
                          "validation and test with a positive sum (e.g. data.split=98,2,0)")
    numbers += [0.0] * (3 - len(numbers))
    total = sum(numbers)
    return tuple(x / total for x in numbers)


def split_documents(split: str, num_documents: int) -> tuple[int, int, int]:
    """Documents of train, validation and test out of ``num_documents``."""
    edges = [0.0]
    for share in split_shares(split):
        edges.append(edges[-1] + share)
    bounds = [round(edge * float(num_documents)) for edge in edges]
    return tuple(max(hi - lo, 0) if edges[i + 1] > edges[i] else 0
                 for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])))


def unused_splits(split: str, documents: Mapping[str, int], *, eval_iters: int) -> frozenset:
    """The splits to leave out of the dataset build: the test split (no run reads it), and
    the validation split when ``eval_iters`` is 0. ``documents`` maps each data.blend prefix
    to its document count. Raises ConfigError naming the prefix and the fix when a split the
    run reads would get no documents."""
    split_shares(split)  # a bad split string fails even without documents (mock data)
    needed = (TRAIN, VALID) if eval_iters > 0 else (TRAIN,)
    for prefix, count in documents.items():
        per_split = split_documents(split, count)
        for i in needed:
            if per_split[i] == 0:
                fix = "set train.eval_iters=0 or " if i == VALID else ""
                raise ConfigError(
                    f"data.split={split!r} gives the {NAMES[i]} split 0 of the {count} "
                    f"documents of {prefix} (Megatron-Core would wait forever for its samples); "
                    f"{fix}give it a larger share, e.g. data.split=98,2,0")
    return frozenset(i for i in (TRAIN, VALID, TEST) if i not in needed)
