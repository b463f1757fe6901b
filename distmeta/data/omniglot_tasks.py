"""N-way K-shot Omniglot tasks over a split's classes (character × rotation)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from distmeta.data.omniglot import DRAWINGS_PER_CHARACTER as DRAWINGS
from distmeta.data.omniglot import Omniglot, omniglot_split
from distmeta.data.sampling import SPLITS, task_rng
from distmeta.types import TaskBatch


@dataclass(frozen=True, eq=False)
class OmniglotTasks:
    """Samples tasks from the preprocessed (memory-mapped) Omniglot arrays.

    A class is a (character, rotation) pair, as in the Vinyals/MAML protocol. Each task picks
    ``ways`` classes and ``shots + queries`` distinct drawings per class; labels follow the
    sampled class order, so label identity carries no information across tasks. The
    character split is fixed (split seed 0) whatever the run seed, so runs are comparable.

    Raises (at construction):
        ValueError: more ways than a split has classes, or more shots + queries than drawings.
    """

    data: Omniglot
    ways: int
    shots: int
    queries: int
    protocol: str = "vinyals"
    rotations: tuple[int, ...] = (0, 90, 180, 270)
    val_characters: int = 100
    seed: int = 0
    characters: dict[str, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.shots + self.queries > DRAWINGS:
            raise ValueError(f"task.shots + task.queries = {self.shots + self.queries} but every "
                             f"Omniglot character has only {DRAWINGS} drawings")
        split_characters = {s: omniglot_split(self.data, self.protocol, s, self.val_characters)
                            for s in SPLITS}
        for split, chars in split_characters.items():
            classes = len(chars) * len(self.rotations)
            if self.ways > classes:
                raise ValueError(f"task.ways = {self.ways} but the {self.protocol!r} {split} split has "
                                 f"only {classes} classes ({len(chars)} characters × "
                                 f"{len(self.rotations)} rotations)")
        object.__setattr__(self, "characters", split_characters)

    def num_classes(self, split: str) -> int:
        """Classes in a split: characters × rotations."""
        return len(self.characters[split]) * len(self.rotations)

    def sample(self, split: str, step: int, start: int, stop: int) -> TaskBatch:
        """Tasks ``start..stop-1``: images (T, N·K or N·Q, 1, 28, 28) in [0, 1], labels (T, ·)."""
        support, query = [], []
        for index in range(start, stop):
            rng = task_rng(self.seed, split, step, index)
            classes = rng.choice(self.num_classes(split), self.ways, replace=False)
            images = np.stack([self._drawings(split, c, rng) for c in classes])  # N, K+Q, 28, 28
            support.append(images[:, : self.shots])
            query.append(images[:, self.shots :])
        return TaskBatch(self._as_batch(np.stack(support)), self._as_batch(np.stack(query)))

    def _drawings(self, split: str, class_id: int, rng: np.random.Generator) -> np.ndarray:
        character = self.characters[split][class_id // len(self.rotations)]
        quarter_turns = self.rotations[class_id % len(self.rotations)] // 90
        chosen = rng.choice(DRAWINGS, self.shots + self.queries, replace=False)
        return np.rot90(self.data.images[character, chosen], k=quarter_turns, axes=(1, 2))

    @staticmethod
    def _as_batch(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        tasks, ways, per_class = images.shape[:3]
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
        labels = torch.arange(ways).repeat_interleave(per_class)
        return x.view(tasks, ways * per_class, 1, *images.shape[3:]), labels.expand(tasks, -1).contiguous()
