"""Data-loading throughput of one loader process, and the processes a GPU training step needs.

    taskset -c 0 python -m benches.data                      # one core: the numbers quoted in README
    python -m benches.data --step-ms 20 --batch 4 --shots 1,5 --sizes pascal,coco

A PASCAL-5i-style folder (JPEG images, grey PNG labels, a list file) of generated scenes at
PASCAL size (500x375) and COCO size (640x480) is written to a temporary folder (in the page cache,
as a dataset in use is). One process, one torch thread and one OpenCV thread, as a loader
process runs. Per size, mode (``train``: the published augmentation and 473 crop; ``val``: the
validation resize and padding) and shot count it times, interleaved after warm-up:

* ``decode``: one image and its label read from disk (OpenCV, as the loader does; Pillow beside it);
* ``transform``: one decoded image and label through the transform;
* ``episode``: a whole episode, as a loader process builds it (read, binarise and transform the
  query and every support), plus its share of collating a batch of ``--batch`` episodes (stacking
  and the host-side label and finiteness checks).

Then, end to end, batches through ``make_loader`` with one loader process (``loader``): the
episodes plus collation into shared memory and the hand-over to the training process, in steady
state (the time between batch arrivals once the first ones are in), median of ``--loader-runs``.
It prints episodes per second of one loader process and the processes needed to feed one GPU
that takes ``--step-ms`` per step on ``--batch`` episodes: ``ceil(batch * loader_ms / step_ms)``.
The machine's other work shows in the quiet-gate counts and the load average in the JSON.
"""
from __future__ import annotations

import argparse
import io
import itertools
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import cv2
import numpy as np
import PIL
import torch
from PIL import Image

from ipmt_fast.data import (EpisodeDataset, TrainTransform, ValTransform, binarize, collate_episodes, make_loader,
                            read_image, read_label, render_scene)

from . import common

# Input sizes (height, width) of a typical PASCAL VOC and COCO image.
SIZES = {"pascal": (375, 500), "coco": (480, 640)}
CROP = 473  # the published training crop and validation size
# Generated dataset: these classes, this many images each (enough for 5 distinct supports).
CLASSES = (1, 2, 3, 4)
IMAGES_PER_CLASS = 8
# Photos are JPEG (the mean file size lands in the JSON, to compare with a real dataset's).
JPEG_QUALITY = 90
# Targets of issue 12 (one core): per PASCAL-sized training image, and per 1-shot training episode.
TARGET_IMAGE_MS = 5.0
TARGET_EPISODE_MS = 12.0
# End-to-end loader timing: batches before the clock starts (the loader process starting and
# filling its prefetch queue).
LOADER_SKIP_BATCHES = 2

TABLE_COLUMNS = (("size", "size"), ("mode", "mode"), ("shot", "shot"),
                 ("decode ms", lambda r: common.fmt_ms(r["decode_ms"])),
                 ("decode (Pillow) ms", lambda r: common.fmt_ms(r["decode_pillow_ms"])),
                 ("transform ms", lambda r: common.fmt_ms(r["transform_ms"])),
                 ("episode ms", lambda r: common.fmt_ms(r["episode_ms"])),
                 ("IQR %", lambda r: f"{100 * r['episode_iqr']:.0f}"),
                 ("loader ms/episode", lambda r: common.fmt_ms(r["loader_ms"])),
                 ("episodes/s", lambda r: f"{r['episodes_per_s']:.0f}"),
                 ("processes/GPU", "processes_per_gpu"))


def write_dataset(root: Path, size: str) -> str:
    """Generated scenes of ``size`` in a PASCAL layout under ``root``; returns the list file."""
    height, width = SIZES[size]
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    lines = []
    for class_id in CLASSES:
        for k in range(IMAGES_PER_CLASS):
            rng = np.random.default_rng([class_id, k])
            image, label = render_scene(class_id, height, width, rng, distractor_classes=CLASSES)
            name = f"{class_id:02d}_{k:02d}"
            cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            cv2.imwrite(str(root / "SegmentationClassAug" / f"{name}.png"), label)
            lines.append(f"JPEGImages/{name}.jpg SegmentationClassAug/{name}.png\n")
    list_path = root / "list.txt"
    list_path.write_text("".join(lines))
    return str(list_path)


def mean_file_bytes(folder: Path) -> int:
    sizes = [p.stat().st_size for p in folder.iterdir()]
    return round(sum(sizes) / len(sizes))


def read_with_pillow(image_path: str, label_path: str):
    with open(image_path, "rb") as f:
        image = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
    with Image.open(label_path) as im:
        return image, np.asarray(im)


def cycling(fn: Callable[[int], object]) -> Callable[[], object]:
    """A zero-argument call that runs ``fn`` on 0, 1, 2, ... (a new episode or file each time)."""
    counter = itertools.count()
    return lambda: fn(next(counter))


def build_variants(root: Path, sizes, modes, shots, batch: int, files: dict, datasets: dict
                   ) -> Dict[str, Callable[[], object]]:
    """The timed calls, by name; ``files`` receives each size's mean image and label file bytes,
    ``datasets`` each (size, mode, shot)'s episode dataset."""
    variants: Dict[str, Callable[[], object]] = {}
    for size in sizes:
        list_path = write_dataset(root / size, size)
        data_root = str(root / size)
        files[size] = {"jpeg_bytes": mean_file_bytes(root / size / "JPEGImages"),
                       "png_label_bytes": mean_file_bytes(root / size / "SegmentationClassAug")}
        items = [line.split() for line in Path(list_path).read_text().splitlines()]
        paths = [(os.path.join(data_root, a), os.path.join(data_root, b)) for a, b in items]
        variants[f"{size}/decode"] = cycling(lambda i, p=paths: (read_image(p[i % len(p)][0]),
                                                                 read_label(p[i % len(p)][1])))
        variants[f"{size}/decode_pillow"] = cycling(lambda i, p=paths: read_with_pillow(*p[i % len(p)]))
        image, label = read_image(paths[0][0]), binarize(read_label(paths[0][1]), CLASSES[0])
        for mode in modes:
            transform = TrainTransform((CROP, CROP)) if mode == "train" else ValTransform(CROP)
            variants[f"{size}/{mode}/transform"] = cycling(
                lambda i, t=transform: t(image, label, np.random.default_rng(i)))
            for shot in shots:
                data = EpisodeDataset(data_root, list_path, CLASSES, shot, transform, mode=mode, seed=0,
                                      cache_index=False)
                datasets[size, mode, shot] = data
                variants[f"{size}/{mode}/{shot}/episode"] = cycling(lambda i, d=data: d[(0, i % len(d))])
                samples = [data[(0, i)] for i in range(batch)]
                variants[f"{size}/{mode}/{shot}/collate"] = lambda s=samples: collate_episodes(s)
    return variants


def loader_ms_per_episode(data, batch: int, batches: int) -> float:
    """Milliseconds per episode through make_loader with one loader process, in steady state."""
    keys = [[(0, (b * batch + i) % len(data)) for i in range(batch)] for b in range(LOADER_SKIP_BATCHES + batches)]
    loader = make_loader(data, keys, "cpu", workers=1)
    batch_iter = iter(loader)
    for _ in range(LOADER_SKIP_BATCHES):
        next(batch_iter)
    start = time.perf_counter()
    for _ in range(batches):
        next(batch_iter)
    elapsed = time.perf_counter() - start
    del batch_iter, loader  # shuts the loader process down
    return elapsed * 1e3 / (batches * batch)


def summarise(stats: Dict[str, common.Stats], loader_ms: Dict[tuple, List[float]], sizes, modes, shots,
              batch: int, step_ms: float) -> List[dict]:
    ms = {name: s.median * 1e3 for name, s in stats.items()}
    rows = []
    for size, mode, shot in itertools.product(sizes, modes, shots):
        key = f"{size}/{mode}/{shot}"
        episode = stats[f"{key}/episode"]
        episode_ms = ms[f"{key}/episode"] + ms[f"{key}/collate"] / batch
        through_loader = statistics.median(loader_ms[size, mode, shot])
        rows.append({
            "size": size, "input_hw": "x".join(map(str, SIZES[size])), "mode": mode, "shot": shot, "batch": batch,
            "decode_ms": ms[f"{size}/decode"], "decode_pillow_ms": ms[f"{size}/decode_pillow"],
            "transform_ms": ms[f"{size}/{mode}/transform"], "collate_ms_per_batch": ms[f"{key}/collate"],
            "episode_ms": episode_ms, "episode_iqr": episode.spread, "episode_samples": episode.n,
            "episode_min_ms": episode.min * 1e3 + ms[f"{key}/collate"] / batch,
            "loader_ms": through_loader, "loader_runs_ms": loader_ms[size, mode, shot],
            "episodes_per_s": 1e3 / through_loader, "step_ms": step_ms,
            "processes_per_gpu": math.ceil(batch * through_loader / step_ms),
            "retaken_samples": episode.retaken, "disturbed_samples": episode.disturbed,
        })
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benches.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="pascal,coco", help=f"comma-separated: {', '.join(SIZES)}")
    p.add_argument("--modes", default="train,val", help="comma-separated: train, val")
    p.add_argument("--shots", default="1,5", help="comma-separated shot counts")
    p.add_argument("--batch", type=int, default=4, help="episodes per GPU per step (published 4)")
    p.add_argument("--step-ms", type=float, default=20.0, help="GPU step time the loaders must keep up with")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--min-sample-ms", type=float, default=50.0,
                   help="each timed sample runs calls (new episodes or files) for at least this long")
    p.add_argument("--loader-batches", type=int, default=8, help="timed batches per end-to-end loader run")
    p.add_argument("--loader-runs", type=int, default=3, help="end-to-end loader runs per configuration")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="seconds each sample may wait for other processes to go quiet (shared CPUs)")
    p.add_argument("--out", help="output folder (default benches/results/<device>/)")
    p.add_argument("--tag", default="data", help="file name stem of the outputs")
    args = p.parse_args(argv)
    args.sizes, args.modes = common.parse_str_list(args.sizes), common.parse_str_list(args.modes)
    args.shots = common.parse_int_list(args.shots)
    for size in args.sizes:
        if size not in SIZES:
            p.error(f"--sizes: unknown size {size!r}; known: {', '.join(SIZES)}")
    for mode in args.modes:
        if mode not in ("train", "val"):
            p.error(f"--modes: unknown mode {mode!r}; known: train, val")
    if not args.shots or min(args.shots) < 1 or max(args.shots) >= IMAGES_PER_CLASS:
        p.error(f"--shots must be between 1 and {IMAGES_PER_CLASS - 1}")
    if min(args.batch, args.loader_batches, args.loader_runs) < 1 or args.step_ms <= 0:
        p.error("--batch, --step-ms, --loader-batches and --loader-runs must be positive")
    return args


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    device = torch.device("cpu")
    # As in a loader process (torch does the same for its workers; make_loader for OpenCV).
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    # Results are filed under the machine (cpu-2core), also when taskset gives this process one core.
    out_dir = Path(args.out) if args.out else common.RESULTS_ROOT / f"cpu-{os.cpu_count()}core"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = common.run_metadata(device, "benches.data")
    meta["machine"].update(opencv=cv2.__version__, numpy=np.__version__, pillow=PIL.__version__,
                           machine_cores=os.cpu_count(), affinity_cores=common.cpu_core_count())
    print(f"# data benchmark: {common.cpu_core_count()} core(s) in this process's affinity, OpenCV "
          f"{cv2.__version__}, batch {args.batch}, step {args.step_ms:g} ms", flush=True)
    with tempfile.TemporaryDirectory(prefix="ipmt-bench-data-") as tmp:
        meta["mean_file_bytes"], datasets = {}, {}
        variants = build_variants(Path(tmp), args.sizes, args.modes, args.shots, args.batch, meta["mean_file_bytes"],
                                  datasets)
        stats = common.measure_interleaved(variants, device, warmup=args.warmup, repeats=args.repeats,
                                           min_sample_s=args.min_sample_ms / 1e3, quiet_wait_s=args.quiet_wait)
        loader_ms = {key: [] for key in datasets}
        for _ in range(args.loader_runs):  # round by round, like the interleaved timings
            for key, data in datasets.items():
                if args.quiet_wait:
                    common.wait_for_quiet(args.quiet_wait)
                loader_ms[key].append(loader_ms_per_episode(data, args.batch, args.loader_batches))
    rows = summarise(stats, loader_ms, args.sizes, args.modes, args.shots, args.batch, args.step_ms)
    meta["finished"] = common.run_metadata(device, "benches.data")["date"]
    meta["variants"] = {name: common.stats_fields(s) for name, s in stats.items()}
    common.write_csv(rows, out_dir / f"{args.tag}.csv")
    common.write_json({"meta": meta, "rows": rows}, out_dir / f"{args.tag}.json")
    print(common.format_table(rows, TABLE_COLUMNS))
    for row in rows:
        if row["size"] == "pascal" and row["mode"] == "train" and row["shot"] == 1:
            image_ms = row["decode_ms"] + row["transform_ms"]
            print(f"# target, PASCAL-sized training image (decode + transform) <= {TARGET_IMAGE_MS:g} ms: "
                  f"{image_ms:.2f} ms ({'met' if image_ms <= TARGET_IMAGE_MS else 'NOT met'})")
            for what, value in (("in one process", row["episode_ms"]), ("through a loader process", row["loader_ms"])):
                print(f"# target, 1-shot PASCAL training episode <= {TARGET_EPISODE_MS:g} ms, {what}: "
                      f"{value:.2f} ms ({'met' if value <= TARGET_EPISODE_MS else 'NOT met'})")
    print(f"# wrote {out_dir}/{args.tag}.csv, .json")
    return rows


if __name__ == "__main__":
    main()
