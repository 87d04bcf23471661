"""The training stream: persistent loader workers see each epoch, and resume continues exactly."""

import torch
from torch.utils.data import Dataset

from gram.data.loader import TrainStream


class SeededItems(Dataset):
    """Items whose content depends on (epoch, index), like VideoTextDataset's per-item generator."""

    def __init__(self, size: int):
        self.size, self.epoch = size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        generator = torch.Generator().manual_seed(1000 * epoch + index)
        return {"index": index, "epoch": epoch, "noise": torch.rand(2, generator=generator)}


def collate(items):
    return {"index": [it["index"] for it in items], "epoch": [it["epoch"] for it in items],
            "noise": torch.stack([it["noise"] for it in items])}


def take(stream: TrainStream, count: int) -> list[dict]:
    return [next(stream) for _ in range(count)]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert [x["index"] for x in a] == [y["index"] for y in b]
    assert [x["epoch"] for x in a] == [y["epoch"] for y in b]
    for x, y in zip(a, b):
        assert torch.equal(x["noise"], y["noise"])


def test_persistent_workers_match_the_main_process_across_epochs_and_resume():
    reference = take(TrainStream(SeededItems(12), collate, 4, num_workers=0, seed=3), 10)  # 3 per epoch
    assert [b["epoch"][0] for b in reference] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert sorted(sum((b["index"] for b in reference[:3]), [])) == list(range(12))  # a full shuffled epoch
    assert [b["index"] for b in reference[:3]] != [b["index"] for b in reference[3:6]]  # reshuffled

    workers = TrainStream(SeededItems(12), collate, 4, num_workers=2, seed=3)
    assert_same(take(workers, 10), reference)

    resumed = TrainStream(SeededItems(12), collate, 4, num_workers=2, seed=3)
    take(resumed, 2)  # a running loader, then a jump to another data position
    resumed.load_state({"epoch": 1, "batches_done": 1})
    assert_same(take(resumed, 6), reference[4:10])
