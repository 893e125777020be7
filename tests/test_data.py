"""Episode datasets: synthetic scenes, PASCAL/COCO layouts written into tmp_path, samplers."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ipmt_fast.data import episodes as ep
from ipmt_fast.data.episodes import (ClassIndex, DataError, EpisodeBatchSampler, EpisodeDataset, collate_episodes,
                                     evaluation_batches, fold_classes)
from ipmt_fast.data.synthetic import (NUM_SYNTHETIC_CLASSES, SyntheticEpisodes, render_scene,
                                      synthetic_fold_classes)
from ipmt_fast.constants import IGNORE_LABEL
from ipmt_fast.data.transforms import TrainTransform, ValTransform

SIDE = 80  # 80 x 80 = 6400 pixels per image
BIG = (slice(0, 70), slice(0, 70))  # 4900 pixels: counts (>= 4096)
SMALL = (slice(72, 80), slice(72, 80))  # 64 pixels: present but does not count


def identity_transform(image, label, rng=None):
    """No augmentation: lets a test read which file an episode used from its pixels."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), torch.from_numpy(label.astype(np.int64))


def write_layout(root, classes_per_image, image_dir="JPEGImages", label_dir="SegmentationClassAug"):
    """One 80x80 PNG image (every pixel = its index) and label per entry of ``classes_per_image``:
    the first class covers 4900 pixels, a second (if any) 64 pixels. Returns the pairs."""
    os.makedirs(os.path.join(root, image_dir), exist_ok=True)
    os.makedirs(os.path.join(root, label_dir), exist_ok=True)
    pairs = []
    for i, classes in enumerate(classes_per_image):
        image = np.full((SIDE, SIDE, 3), i, np.uint8)
        label = np.zeros((SIDE, SIDE), np.uint8)
        label[BIG] = classes[0]
        if len(classes) > 1:
            label[SMALL] = classes[1]
        label[70:72, :] = IGNORE_LABEL
        pair = (f"{image_dir}/{i:04d}.png", f"{label_dir}/{i:04d}.png")
        Image.fromarray(image).save(os.path.join(root, pair[0]))
        Image.fromarray(label).save(os.path.join(root, pair[1]))
        pairs.append(pair)
    return pairs


@pytest.fixture
def pascal_root(tmp_path):
    # Classes 1..3 (fold 0 test classes) and 6 (a training class); image 7 has class 2 only small.
    layout = [(1,), (1,), (1, 2), (2,), (2,), (3,), (3,), (6, 2), (6,), (1,)]
    pairs = write_layout(str(tmp_path), layout)
    list_path = tmp_path / "val.txt"
    list_path.write_text("".join(f"{a} {b}\n" for a, b in pairs))
    return tmp_path, str(list_path)


# --------------------------------------------------------------------------- synthetic
def test_render_scene_is_deterministic_and_labelled():
    a = render_scene(5, 41, 67, np.random.default_rng(3), distractor_classes=range(1, 13))
    b = render_scene(5, 41, 67, np.random.default_rng(3), distractor_classes=range(1, 13))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    image, label = a
    assert image.shape == (41, 67, 3) and image.dtype == np.uint8 and label.shape == (41, 67)
    assert (label == 5).sum() > 50
    assert set(np.unique(label).tolist()) <= set(range(NUM_SYNTHETIC_CLASSES + 1)) | {IGNORE_LABEL}
    c = render_scene(5, 41, 67, np.random.default_rng(4))
    assert not np.array_equal(a[0], c[0])


def test_synthetic_folds_partition_the_classes():
    seen = []
    for split in range(4):
        train, test = synthetic_fold_classes(split)
        assert len(test) == 3 and not set(train) & set(test)
        assert sorted(train + test) == list(range(1, NUM_SYNTHETIC_CLASSES + 1))
        seen += test
    assert sorted(seen) == list(range(1, NUM_SYNTHETIC_CLASSES + 1))


def test_synthetic_episodes_shapes_classes_and_determinism():
    train, test = synthetic_fold_classes(1)
    data = SyntheticEpisodes(train, 2, TrainTransform((33, 33)), size=33, length=10, seed=5)
    sample = data[(2, 7)]
    assert sample["image"].shape == (3, 33, 33) and sample["label"].shape == (33, 33)
    assert sample["support_images"].shape == (2, 3, 33, 33) and sample["support_labels"].shape == (2, 33, 33)
    assert sample["class_id"] in train
    assert (sample["support_labels"] == 1).flatten(1).any(1).all()  # every shot shows the class
    again = data[(2, 7)]
    assert all(torch.equal(sample[k], again[k]) for k in ("image", "label", "support_images", "support_labels"))
    assert not torch.equal(data[(3, 7)]["image"], sample["image"])

    val = SyntheticEpisodes(test, 1, ValTransform(33), size=33, length=6, seed=5, mode="val")
    assert len(val) == 6
    v = val[0]
    assert v["class_id"] in test and v["original_label"].dtype == torch.int64
    assert set(v["original_label"].unique().tolist()) <= {0, 1, IGNORE_LABEL}


# --------------------------------------------------------------------------- folds
def test_fold_classes_follow_the_published_splits():
    assert fold_classes("pascal", 1) == (tuple(range(1, 6)) + tuple(range(11, 21)), tuple(range(6, 11)))
    assert fold_classes("pascal", 0)[1] == (1, 2, 3, 4, 5)
    assert fold_classes("coco", 0, "interleaved")[1] == tuple(range(1, 78, 4))
    assert fold_classes("coco", 3, "interleaved")[1] == tuple(range(4, 81, 4))
    assert fold_classes("coco", 2, "blocks")[1] == tuple(range(41, 61))
    train, test = fold_classes("coco", 1, "interleaved")
    assert len(train) == 60 and sorted(train + test) == list(range(1, 81))
    with pytest.raises(ValueError, match="split"):
        fold_classes("pascal", 4)


# --------------------------------------------------------------------------- PASCAL layout
def test_class_index_counts_and_caches(pascal_root, monkeypatch):
    root, list_path = pascal_root
    index = ClassIndex.load_or_build(list_path, str(root))
    assert index.counts[2] == {1: 70 * 70, 2: 8 * 8}
    assert index.items[0] == (os.path.join(str(root), "JPEGImages/0000.png"),
                              os.path.join(str(root), "SegmentationClassAug/0000.png"))
    cache = list_path + ep.CLASS_INDEX_SUFFIX
    with open(cache) as f:
        assert json.load(f)["key"]["version"] == ep.CLASS_INDEX_VERSION

    def no_reading(path):
        raise AssertionError("the cached index should be used")

    monkeypatch.setattr(ep, "read_label", no_reading)
    assert ClassIndex.load_or_build(list_path, str(root)).counts == index.counts
    monkeypatch.undo()
    # A changed list (or version) rebuilds the index.
    with open(list_path, "a") as f:
        f.write("JPEGImages/0000.png SegmentationClassAug/0000.png\n")
    assert len(ClassIndex.load_or_build(list_path, str(root)).items) == len(index.items) + 1


def test_pascal_queries_filter_and_support_sampling(pascal_root):
    root, list_path = pascal_root
    test_classes = fold_classes("pascal", 0)[1]
    one_shot = EpisodeDataset(str(root), list_path, test_classes, shot=1, transform=identity_transform, mode="val")
    # Images 0..6 and 9 have a test class covering >= 4096 pixels; image 7 has class 2 only small, 8 none.
    assert [item for item, _ in one_shot.queries] == [0, 1, 2, 3, 4, 5, 6, 9]
    assert dict(one_shot.queries)[2] == (1, 2)  # the query class may be small (published), supports may not
    assert one_shot.support_pool[2] == [3, 4]
    # 2-shot: classes 2 and 3 have two images each, so their own images lack a second support.
    data = EpisodeDataset(str(root), list_path, test_classes, shot=2, transform=identity_transform, mode="val",
                          seed=1, episodes=40)
    assert [item for item, _ in data.queries] == [0, 1, 2, 9] and data.queries_without_supports == 4
    for index in range(len(data)):
        sample = data[index]
        query_item = data.queries[index % len(data.queries)][0]
        used = [int(s[0, 0, 0]) for s in sample["support_images"]]
        assert int(sample["image"][0, 0, 0]) == query_item
        assert len(set(used)) == 2 and query_item not in used
        assert all(used_item in data.support_pool[sample["class_id"]] for used_item in used)
        assert set(sample["original_label"].unique().tolist()) <= {0, 1, IGNORE_LABEL}
    assert data[5]["class_id"] == data[5]["class_id"]  # fixed-seed episodes
    assert torch.equal(data[5]["support_images"], data[5]["support_images"])


def test_coco_layout_json_list(tmp_path):
    classes = fold_classes("coco", 0, "interleaved")[1]  # 1, 5, 9, ...
    layout = [(1,), (1,), (5,), (5,), (9,), (9,), (2,), (2,)]
    pairs = write_layout(str(tmp_path), layout, image_dir="val2014", label_dir="annotations/val2014")
    list_path = tmp_path / "val_list.json"
    list_path.write_text(json.dumps([list(p) for p in pairs]))
    data = EpisodeDataset(str(tmp_path), str(list_path), classes, shot=1, transform=ValTransform(33), mode="val",
                          seed=0, episodes=9)
    assert len(data) == 9 and len(data.queries) == 6
    batch = collate_episodes([data[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 33, 33) and batch["support_labels"].shape == (3, 1, 33, 33)
    assert batch["class_id"].tolist() == [1, 1, 5]
    assert [t.shape for t in batch["original_label"]] == [(SIDE, SIDE)] * 3


# --------------------------------------------------------------------------- bad inputs
def test_missing_root_and_list_name_the_path(tmp_path, pascal_root):
    root, list_path = pascal_root
    with pytest.raises(DataError, match="data root not found: .*nowhere"):
        EpisodeDataset(str(tmp_path / "nowhere"), list_path, (1, 2), 1, identity_transform)
    with pytest.raises(DataError, match="list file not found: .*missing.txt"):
        EpisodeDataset(str(root), str(tmp_path / "missing.txt"), (1, 2), 1, identity_transform)
    bad = tmp_path / "bad.txt"
    bad.write_text("only_one_field.png\n")
    with pytest.raises(DataError, match="bad.txt:1"):
        EpisodeDataset(str(root), str(bad), (1, 2), 1, identity_transform)


def test_unreadable_image_errors_in_val_and_is_skipped_in_train(pascal_root):
    root, list_path = pascal_root
    broken = os.path.join(str(root), "JPEGImages", "0000.png")
    with open(broken, "wb") as f:
        f.write(b"not a png")
    val = EpisodeDataset(str(root), list_path, (1, 2, 3), 1, identity_transform, mode="val", episodes=8, seed=0)
    with pytest.raises(DataError, match="0000.png"):
        for i in range(len(val)):
            val[i]
    train = EpisodeDataset(str(root), list_path, (1, 2, 3), 1, identity_transform, mode="train", seed=0)
    samples = [train[(0, i)] for i in range(len(train))]
    skipped = [p for s in samples for p in s["skipped"]]
    assert skipped and set(skipped) == {broken}
    assert all(int(s["image"][0, 0, 0]) != 0 for s in samples)


def test_size_mismatch_names_both_files(pascal_root):
    root, list_path = pascal_root
    label_path = os.path.join(str(root), "SegmentationClassAug", "0005.png")
    Image.fromarray(np.full((40, 50), 3, np.uint8)).save(label_path)  # still class 3, but 50x40
    data = EpisodeDataset(str(root), list_path, (3,), 1, identity_transform, mode="train", seed=0, min_pixels=100)
    with pytest.raises(DataError, match=r"0005.png is 80x80, .*0005.png is 50x40"):
        for i in range(len(data)):
            data[(0, i)]


# --------------------------------------------------------------------------- samplers
def test_rank_batches_concatenate_to_the_single_process_batches():
    single = EpisodeBatchSampler(23, 4, seed=9)
    ranks = [EpisodeBatchSampler(23, 4, rank=r, world_size=2, seed=9) for r in range(2)]
    for epoch in (0, 3):
        for s in [single] + ranks:
            s.set_epoch(epoch)
        joined = [a + b for a, b in zip(*ranks)]
        assert joined == list(single) and len(joined) == 23 // 4
        assert all(key[0] == epoch for batch in joined for key in batch)
    # Resuming at batch 2 of epoch 3 continues with exactly the remaining batches.
    full = list(single)
    single.set_epoch(3, start_batch=2)
    assert list(single) == full[2:] and len(single) == len(full) - 2
    single.set_epoch(1)
    assert list(single) != full


def test_evaluation_batches_split_every_episode_once():
    shares = [evaluation_batches(10, 3, rank, 3) for rank in range(3)]
    flat = sorted(i for share in shares for batch in share for i in batch)
    assert flat == list(range(10))
    assert shares[0] == [[0, 3, 6], [9]]
