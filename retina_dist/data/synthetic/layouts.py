"""``retina-dist synth <dataset>``: synthetic images written in a real dataset's on-disk layout.

Same folder trees, CSV/XLSX headers, file-name patterns and traps as ../shared/DATASETS.md records
(Kermany's ``OCT2017 `` with a trailing space, ODIR's full-width comma, RFMiD's BOM and per-split
IDs, images of several sizes), drawn by the skeleton's generator so labels are learnable: DR grade
-> lesions, cataract / media haze -> blur, OCT classes -> their B-scan signs. It is the fixture
factory of the tests and the embedded default of every preset.
"""

from __future__ import annotations

import csv
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from retina_dist.data.codec import encode
from retina_dist.data.sources import kermany, odir, rfmid
from retina_dist.data.synthetic.images import generate

VERSIONS = {
    "aptos": ("kaggle",),
    "kermany": ("kaggle", "mendeley-v2", "mendeley-v3"),
    "octmnist": ("medmnist",),
    "odir": ("official", "oia-odir", "kaggle", "kaggle-full_df"),
    "rfmid": ("original", "kaggle", "dataport"),
}


def _fundus(seed: int, index: int, size: int, grade: int, blur: bool = False) -> np.ndarray:
    """A fundus photograph of ``size`` px height, 4:3 with black side margins like a camera frame."""
    img = generate("fundus", seed, index, size, grade).image
    if blur:  # cataract / media haze: a veiled, low-contrast view
        img = cv2.addWeighted(cv2.GaussianBlur(img, (0, 0), size / 40), 0.8, np.full_like(img, 180), 0.2, 0)
    pad = size // 6
    return cv2.copyMakeBorder(img, 0, 0, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))


def _sizes(size: int) -> list[int]:
    return [size, round(size * 1.25), round(size * 1.5)]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _csv(path: Path, header: list[str], rows: list[list], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _xlsx(path: Path, header: list[str], rows: list[list]) -> None:
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(header)
    for r in rows:
        ws.append(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    wb.save(path)


# -- APTOS --------------------------------------------------------------------------------------
def aptos(out: Path, n: int, size: int, seed: int, version: str) -> None:
    rng = np.random.default_rng(seed)
    grades = rng.choice(5, size=n, p=[0.45, 0.12, 0.25, 0.08, 0.10])
    m = n + max(1, n // 10)
    codes = list(dict.fromkeys(f"{int(v):012x}" for v in rng.integers(0, 16**12, size=2 * m)))[:m]
    rows = []
    for i in range(n):
        s = int(rng.choice(_sizes(size)))
        _write(out / "train_images" / f"{codes[i]}.png", encode(_fundus(seed, i, s, int(grades[i])), ".png"))
        rows.append([codes[i], int(grades[i])])
    _csv(out / "train.csv", ["id_code", "diagnosis"], rows)
    test = codes[n : n + max(1, n // 10)]
    for j, code in enumerate(test):
        _write(out / "test_images" / f"{code}.png", encode(_fundus(seed + 1, j, size, 0), ".png"))
    _csv(out / "test.csv", ["id_code"], [[c] for c in test])
    _csv(out / "sample_submission.csv", ["id_code", "diagnosis"], [[c, 0] for c in test])


# -- Kermany ------------------------------------------------------------------------------------
def kermany_layout(out: Path, n: int, size: int, seed: int, version: str) -> None:
    """Images of ``size`` rows and the real set's widths (512, 768 or 1024 px at its 496 rows), a
    patient's 1-3 B-scans per class, a fifth of the patients under two classes. The plan (names,
    labels, widths) is drawn first, in one sequence; the images are a pure function of (seed, index),
    so drawing them on every core writes the same files as one process."""
    root = {
        "kaggle": out / "OCT2017 ",
        "mendeley-v2": out / "OCT2017",
        "mendeley-v3": out / "ZhangLabData" / "CellData" / "OCT",
    }[version]
    rng = np.random.default_rng(seed)
    splits = ["train", "val", "test"] if version == "kaggle" else ["train", "test"]
    i, patient = 0, 0
    ids = rng.choice(np.arange(100000, 9999999), size=n + 1, replace=False)
    plan: list[tuple[str, int, int, int]] = []  # (path, index, label, width)
    while i < n:
        split = splits[int(rng.choice(len(splits), p=[0.7, 0.1, 0.2] if len(splits) == 3 else [0.8, 0.2]))]
        pid = int(ids[patient])
        patient += 1
        # the same patient id under two classes, as the real set has (e.g. DRUSEN and NORMAL)
        classes = rng.choice(4, size=2, replace=False) if rng.random() < 0.2 else [int(rng.integers(4))]
        for label in classes:
            for k in range(1, int(rng.integers(1, 4)) + 1):
                if i == n:
                    break
                w = int(
                    rng.choice([round(size * 512 / 496), round(size * 768 / 496), round(size * 1024 / 496)])
                )
                name = kermany.CLASSES[label]
                plan.append((str(root / split / name / f"{name}-{pid}-{k}.jpeg"), i, int(label), w))
                i += 1
    jobs = [(seed, size, plan[j : j + 256]) for j in range(0, len(plan), 256)]
    if len(plan) < 2000:  # a pool's start-up outweighs the work
        for job in jobs:
            _write_bscans(job)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool() as pool:
        for _ in pool.imap_unordered(_write_bscans, jobs):
            pass


def _write_bscans(job: tuple[int, int, list[tuple[str, int, int, int]]]) -> None:
    seed, size, plan = job
    for path, i, label, w in plan:
        img = cv2.resize(generate("oct", seed, i, size, label).image, (w, size), interpolation=cv2.INTER_AREA)
        _write(Path(path), encode(img, ".jpg", 75))  # ~70 KB at 512 x 496, as the real files


# -- OCTMNIST -----------------------------------------------------------------------------------
def octmnist(out: Path, n: int, size: int, seed: int, version: str) -> None:
    side = size if size in (64, 128, 224) else 28
    rng = np.random.default_rng(seed)
    counts = {"train": n - 2 * max(1, n // 8), "val": max(1, n // 8), "test": max(1, n // 8)}
    arrays, i = {}, 0
    for split, m in counts.items():
        labels = rng.integers(0, 4, size=m)
        imgs = [
            cv2.resize(
                generate("oct", seed, i + j, max(side, 48), int(lb)).image,
                (side, side),
                interpolation=cv2.INTER_AREA,
            )
            for j, lb in enumerate(labels)
        ]
        i += m
        arrays[f"{split}_images"] = np.stack(imgs).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / ("octmnist.npz" if side == 28 else f"octmnist_{side}.npz"), **arrays)  # type: ignore[arg-type]


# -- ODIR-5K ------------------------------------------------------------------------------------
ODIR_HEADER = [
    "ID",
    "Patient Age",
    "Patient Sex",
    "Left-Fundus",
    "Right-Fundus",
    "Left-Diagnostic Keywords",
    "Right-Diagnostic Keywords",
    *odir.CLASSES,
]
WORDS = {
    "D": "moderate non proliferative retinopathy",
    "G": "glaucoma",
    "C": "cataract",
    "A": "wet age-related macular degeneration",
    "H": "hypertensive retinopathy",
    "M": "pathological myopia",
    "O": "epiretinal membrane",
}


def _odir_patients(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    ids = sorted(int(x) for x in rng.choice(4785, size=n, replace=False))  # non-contiguous, as 0-4784
    out = []
    for pid in ids:
        eyes: dict[str, set] = {"left": set(), "right": set()}
        for c, p in (("D", 0.3), ("C", 0.15), ("G", 0.08), ("A", 0.06), ("H", 0.05), ("M", 0.06), ("O", 0.1)):
            if rng.random() < p:
                for eye in (
                    ["left", "right"]
                    if c == "D" and rng.random() < 0.6
                    else [str(rng.choice(["left", "right"]))]
                ):
                    eyes[eye].add(c)
        label = [int(any(c in e for e in eyes.values())) for c in odir.CLASSES]
        label[0] = int(sum(label) == 0)
        out.append(
            {
                "id": pid,
                "age": int(rng.integers(30, 90)),
                "sex": str(rng.choice(["Female", "Male"])),
                "eyes": eyes,
                "label": label,
            }
        )
    return out


def _odir_eye(seed: int, pid: int, side: int, eye: set, size: int) -> bytes:
    grade = 3 if "D" in eye else 0
    return encode(_fundus(seed, pid * 2 + side, size, grade, blur="C" in eye), ".jpg")


def _keywords(eye: set) -> str:
    return "，".join(WORDS[c] for c in sorted(eye)) if eye else "normal fundus"  # full-width comma


def odir_layout(out: Path, n: int, size: int, seed: int, version: str) -> None:
    patients = _odir_patients(n, seed)
    rng = np.random.default_rng(seed + 1)
    rows = [
        [
            p["id"],
            p["age"],
            p["sex"],
            f"{p['id']}_left.jpg",
            f"{p['id']}_right.jpg",
            _keywords(p["eyes"]["left"]),
            _keywords(p["eyes"]["right"]),
            *p["label"],
        ]
        for p in patients
    ]
    images = {
        "official": out / "ODIR-5K_Training_Dataset",
        "oia-odir": out / "Training Set" / "Images",
        "kaggle": out / "ODIR-5K" / "ODIR-5K" / "Training Images",
        "kaggle-full_df": out / "preprocessed_images",
    }[version]
    for p in patients:
        s = int(rng.choice(_sizes(size)))
        for side, eye in enumerate(("left", "right")):
            _write(images / f"{p['id']}_{eye}.jpg", _odir_eye(seed, p["id"], side, p["eyes"][eye], s))
    if version == "official":
        _xlsx(out / odir.OFFICIAL_XLSX, ODIR_HEADER, rows)
        _write(out / "ODIR-5K_Testing_Images" / "9000_left.jpg", _odir_eye(seed, 9000, 0, set(), size))
    elif version == "oia-odir":
        _xlsx(out / "Training Set" / "Annotation" / "training annotation (English).xlsx", ODIR_HEADER, rows)
    else:
        if version == "kaggle":
            _xlsx(out / "ODIR-5K" / "ODIR-5K" / "data.xlsx", ODIR_HEADER, rows)
            (out / "preprocessed_images").mkdir(parents=True, exist_ok=True)
        full = []
        for r, p in zip(rows, patients, strict=True):
            for eye in ("left", "right"):
                stale = (
                    f"../input/ocular-disease-recognition-odir5k/ODIR-5K/Training Images/{p['id']}_{eye}.jpg"
                )
                labels = [c for c, v in zip(odir.CLASSES, p["label"], strict=True) if v][:1]
                onehot = "[" + ", ".join(str(int(c in labels)) for c in odir.CLASSES) + "]"
                full.append([*r, stale, str(labels), onehot, f"{p['id']}_{eye}.jpg"])
                if version == "kaggle":
                    shutil.copy(images / f"{p['id']}_{eye}.jpg", out / "preprocessed_images")
        _csv(out / "full_df.csv", [*ODIR_HEADER, "filepath", "labels", "target", "filename"], full)


# -- RFMiD --------------------------------------------------------------------------------------
def rfmid_layout(out: Path, n: int, size: int, seed: int, version: str, columns: int = 47) -> None:
    rng = np.random.default_rng(seed)
    counts = {"train": n - 2 * max(2, n // 6), "val": max(2, n // 6), "test": max(2, n // 6)}
    diseases = [*rfmid.NAMED, *rfmid.RARE]
    prev = {c: 0.03 for c in diseases} | {"DR": 0.25, "MH": 0.2, "ODC": 0.12, "TSLN": 0.08, "DN": 0.07}
    header = ["ID", "Disease_Risk", *(diseases if columns == 47 else [*rfmid.NAMED, "OTHER"])]
    index = 0
    for split, top, sub, csv_name, dfolder, dcsv in rfmid.SPLITS:
        if version == "original":
            folder, csv_path = out / top / sub, out / top / csv_name
        elif version == "kaggle":
            folder, csv_path = out / top / top / sub, out / top / top / csv_name
        else:
            base = out / "A. RFMiD_All_Classes_Dataset"
            folder, csv_path = base / "1. Original Images" / dfolder, base / "2. Groundtruths" / dcsv
        rows = []
        for rid in range(1, counts[split] + 1):  # IDs restart at 1 in every split
            pos = {c for c in diseases if rng.random() < prev[c]}
            values = [int(c in pos) for c in diseases]
            if columns == 30:
                values = values[: len(rfmid.NAMED)] + [int(bool(pos & set(rfmid.RARE)))]
            rows.append([rid, int(bool(pos)), *values])
            img = _fundus(
                seed, index, int(rng.choice(_sizes(size))), 3 if "DR" in pos else 0, blur="MH" in pos
            )
            _write(folder / f"{rid}.png", encode(img, ".png"))
            index += 1
        _csv(csv_path, header, rows, bom=split == "train" and version == "original")


WRITERS: dict[str, Callable[..., None]] = {
    "aptos": aptos,
    "kermany": kermany_layout,
    "octmnist": octmnist,
    "odir": odir_layout,
    "rfmid": rfmid_layout,
}


def synth(
    dataset: str,
    out: str | Path,
    n: int = 40,
    size: int = 64,
    seed: int = 0,
    version: str | None = None,
    archive: str | None = None,
    columns: int = 47,
) -> Path:
    """Write ``n`` synthetic samples of ``dataset`` in its real layout under ``out``; with ``archive``
    (zip | tar.gz) pack that tree into ``out.<archive>`` as it would be downloaded, and return it."""
    if dataset not in WRITERS:
        raise ValueError(f"synth: unknown dataset {dataset!r}; known: {', '.join(WRITERS)}")
    version = version or VERSIONS[dataset][0]
    if version not in VERSIONS[dataset]:
        raise ValueError(
            f"synth {dataset}: unknown version {version!r}; known: {', '.join(VERSIONS[dataset])}"
        )
    out = Path(out)
    kwargs = {"columns": columns} if dataset == "rfmid" else {}
    WRITERS[dataset](out, n, size, seed, version, **kwargs)
    if archive is None:
        return out
    files = sorted(p for p in out.rglob("*") if p.is_file())
    if archive == "zip":
        dest = out.with_name(out.name + ".zip")
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
            for p in files:
                zf.write(p, p.relative_to(out).as_posix())
    elif archive == "tar.gz":
        dest = out.with_name(out.name + ".tar.gz")
        with tarfile.open(dest, "w:gz") as tf:
            for p in files:
                tf.add(p, p.relative_to(out).as_posix())
    else:
        raise ValueError(f"synth: archive must be zip or tar.gz, not {archive!r}")
    return dest
