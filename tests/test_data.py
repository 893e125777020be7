"""Episode data: decoding, synthetic scenes, PASCAL/COCO layouts written into tmp_path, the checks on
what reaches the model, samplers, the loader and the module layout."""
import ast
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import ipmt_fast.data
from ipmt_fast.constants import IGNORE_LABEL
from ipmt_fast.data import episodes as ep
from ipmt_fast.data.base import (PREFETCH_BATCHES, DataError, EpisodeBatchSampler, UnreadableFileError, binarize,
                                 collate_episodes, evaluation_batches, make_loader)
from ipmt_fast.data.episodes import ClassIndex, EpisodeDataset, fold_classes
from ipmt_fast.data.files import read_image, read_label
from ipmt_fast.data.synthetic import (NUM_SYNTHETIC_CLASSES, SyntheticEpisodes, render_scene,
                                      synthetic_fold_classes)
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
    # The published SemData lists, written out: PASCAL fold k tests 5k+1..5k+5; COCO with
    # use_split_coco tests k+1, k+5, ..., k+77, without it 20k+1..20k+20; training = the rest.
    published_test = {
        ("pascal", None): [list(range(1, 6)), list(range(6, 11)), list(range(11, 16)), list(range(16, 21))],
        ("coco", "interleaved"): [list(range(1, 78, 4)), list(range(2, 79, 4)), list(range(3, 80, 4)),
                                  list(range(4, 81, 4))],
        ("coco", "blocks"): [list(range(1, 21)), list(range(21, 41)), list(range(41, 61)), list(range(61, 81))],
    }
    for (dataset, coco_split), folds in published_test.items():
        total = 20 if dataset == "pascal" else 80
        for split, test in enumerate(folds):
            train, ours = fold_classes(dataset, split, coco_split or "interleaved")
            assert list(ours) == test
            assert list(train) == sorted(set(range(1, total + 1)) - set(test))
    with pytest.raises(ValueError, match="split"):
        fold_classes("pascal", 4)
    with pytest.raises(ValueError, match="coco_split"):
        fold_classes("coco", 0, "rows")


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


# --------------------------------------------------------------------------- decoding
def _smooth_image(h, w):
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs * 255 // w, ys * 255 // h, (xs + ys) % 256], -1).astype(np.uint8)


def test_read_image_is_the_published_imread(tmp_path):
    path = str(tmp_path / "photo.jpg")
    cv2.imwrite(path, _smooth_image(37, 53))
    image = read_image(path)
    published = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert image.dtype == np.uint8 and image.shape == (37, 53, 3)
    assert np.array_equal(image, published)


def test_read_label_grey_palette_and_colour_files(tmp_path):
    classes = np.random.default_rng(0).integers(0, 21, (9, 11)).astype(np.uint8)
    classes[0] = IGNORE_LABEL
    Image.fromarray(classes).save(tmp_path / "grey.png")  # SegmentationClassAug style
    palette = Image.fromarray(classes, mode="P")
    palette.putpalette([(i * 37) % 256 for i in range(256 * 3)])  # VOC SegmentationClass style
    palette.save(tmp_path / "palette.png")
    colour = np.random.default_rng(1).integers(0, 256, (9, 11, 3)).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    assert np.array_equal(read_label(str(tmp_path / "grey.png")), classes)
    assert np.array_equal(read_label(str(tmp_path / "palette.png")), classes)
    # Any other file: the grey levels the published loader reads.
    assert np.array_equal(read_label(str(tmp_path / "colour.png")),
                          cv2.imread(str(tmp_path / "colour.png"), cv2.IMREAD_GRAYSCALE))
    assert all(read_label(str(tmp_path / f)).dtype == np.uint8 for f in ("grey.png", "palette.png", "colour.png"))


def test_unreadable_files_name_the_path(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    for name, reason in (("missing.png", "file not found"), ("empty.png", "empty file"), ("garbage.jpg", "decode"),
                         ("broken.png", "")):
        for reader in (read_image, read_label):
            with pytest.raises(UnreadableFileError, match=f"cannot read .*{name}: .*{reason}") as info:
                reader(str(tmp_path / name))
            assert info.value.path == str(tmp_path / name)


def test_binarize_maps_the_class_to_1_and_keeps_255():
    label = np.array([[0, 3, 7], [255, 3, 1]], np.uint8)
    assert binarize(label, 3).tolist() == [[0, 1, 0], [255, 1, 0]]
    with pytest.raises(ValueError, match="uint8"):
        binarize(label.astype(np.int64), 3)


# --------------------------------------------------------------------------- checks before the model
def _corrupting(value, key):
    """A transform that writes ``value`` into the top-left pixel of its label or image (all channels)."""
    def transform(image, label, rng=None):
        x, y = ValTransform(33)(image, label)
        (y if key == "label" else x)[..., 0, 0] = value
        return x, y
    return transform


@pytest.mark.parametrize("value", [2, 7, 254, 256, -1])
def test_collate_rejects_bad_label_values_naming_the_episode_and_files(pascal_root, value):
    root, list_path = pascal_root
    data = EpisodeDataset(str(root), list_path, (1, 2, 3), 1, _corrupting(value, "label"), mode="val", episodes=8)
    clean = EpisodeDataset(str(root), list_path, (1, 2, 3), 1, ValTransform(33), mode="val", episodes=8)
    batch = collate_episodes([clean[0], clean[1]])
    assert set(batch["label"].unique().tolist()) <= {0, 1, IGNORE_LABEL}
    with pytest.raises(DataError, match=rf"episode \(0, 2\) \(class \d\), files .*0002.png.*label holds \[{value}\]"):
        collate_episodes([clean[0], data[2]])


def test_collate_rejects_float_labels():
    sample = {"image": torch.zeros(3, 9, 9), "label": torch.zeros(9, 9), "support_images": torch.zeros(1, 3, 9, 9),
              "support_labels": torch.zeros(1, 9, 9, dtype=torch.int64), "class_id": 1, "skipped": []}
    with pytest.raises(DataError, match="label must hold integer labels, got torch.float32"):
        collate_episodes([sample])


@pytest.mark.parametrize("value,what", [(float("nan"), "3 NaN and 0 infinite"), (float("inf"), "0 NaN and 3 infinite")])
def test_collate_rejects_non_finite_images(pascal_root, value, what):
    root, list_path = pascal_root
    data = EpisodeDataset(str(root), list_path, (1, 2, 3), 1, _corrupting(value, "image"), mode="val", episodes=8)
    with pytest.raises(DataError, match=rf"episode \(0, 1\).*image holds {what} values"):
        collate_episodes([data[1]])


# --------------------------------------------------------------------------- loader
def test_loader_settings():
    data = SyntheticEpisodes((1, 2), 1, ValTransform(33), size=33, length=4, mode="val")
    batches = evaluation_batches(4, 2)
    serial = make_loader(data, batches, "cpu")
    assert serial.num_workers == 0 and not serial.pin_memory and not serial.persistent_workers
    parallel = make_loader(data, batches, torch.device("cuda"), workers=2)
    assert parallel.pin_memory and parallel.persistent_workers and parallel.prefetch_factor == PREFETCH_BATCHES
    with pytest.raises(ValueError, match="workers"):
        make_loader(data, batches, "cpu", workers=-1)


def test_loader_processes_give_the_batches_of_the_main_process():
    data = SyntheticEpisodes((4, 5, 6), 2, TrainTransform((33, 33)), size=33, length=8, seed=3)
    sampler = EpisodeBatchSampler(len(data), 2, seed=3)
    sampler.set_epoch(1)
    serial = list(make_loader(data, sampler, "cpu"))
    parallel = make_loader(data, sampler, "cpu", workers=2)
    for _ in range(2):  # persistent workers serve a second pass over the epoch too
        for a, b in zip(serial, parallel):
            for key in ("image", "label", "support_images", "support_labels", "class_id"):
                assert torch.equal(a[key], b[key])


def test_data_errors_in_loader_processes_reach_the_caller(pascal_root):
    root, list_path = pascal_root
    data = EpisodeDataset(str(root), list_path, (1, 2, 3), 1, _corrupting(7, "label"), mode="val", episodes=4)
    with pytest.raises(DataError, match="label holds"):
        next(iter(make_loader(data, evaluation_batches(4, 2), "cpu", workers=1)))


# --------------------------------------------------------------------------- layout
PACKAGE = Path(ipmt_fast.data.__file__).resolve().parent.parent


def _relative_imports(path: Path):
    """Modules of ``ipmt_fast.data`` that ``path`` imports (at any depth: also inside functions)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            yield from names


def test_data_modules_import_without_a_cycle():
    modules = {p.stem: set(_relative_imports(p)) for p in (PACKAGE / "data").glob("*.py") if p.stem != "__init__"}
    done, visiting = set(), set()

    def visit(name, chain):
        assert name not in visiting, f"import cycle: {' -> '.join(chain + [name])}"
        if name in done or name not in modules:
            return
        visiting.add(name)
        for imported in modules[name]:
            visit(imported, chain + [name])
        visiting.discard(name)
        done.add(name)

    for name in modules:
        visit(name, [])


def test_label_values_and_stride_are_defined_once():
    names = {"BACKGROUND_LABEL", "FOREGROUND_LABEL", "IGNORE_LABEL", "VALID_LABELS", "OUTPUT_STRIDE", "FOREGROUND",
             "SIZE_MULTIPLE"}
    definitions = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                definitions += [f"{path.relative_to(PACKAGE)}:{t.id}" for t in targets
                                if isinstance(t, ast.Name) and t.id in names]
    assert sorted(definitions) == sorted(f"constants.py:{n}" for n in names - {"FOREGROUND", "SIZE_MULTIPLE"})
