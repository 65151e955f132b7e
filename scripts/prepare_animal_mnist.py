#!/usr/bin/env python3
"""Converts Animal-MNIST (PyPI package `animal-mnist`, MIT) once into MNIST-style IDX files.

    python3 scripts/prepare_animal_mnist.py [--out DIR] [--wheel FILE] [--preview N] [--force]

What it does:
  * downloads the pinned wheel with
      python3 -m pip download --no-deps --only-binary=:all: animal-mnist==0.4 -d <tmpdir>
    (no TensorFlow or other dependency is installed) and checks its sha256; `--wheel FILE`
    uses a wheel already on disk instead;
  * reads the two gzipped numpy pickles in `animal_mnist/data/Animal_MNIST/` with a restricted
    unpickler that understands plain ndarray pickles, so neither numpy nor the package is needed
    (and no code from the pickle can run);
  * writes, into DIR (default: data/animal-mnist under the repository root):
      train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz   (9,000 images, 900 per class)
      t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz    (1,000 images, 100 per class)
      classes.txt  SOURCE.txt  checksums.sha256
    The IDX files are uint8 (magic 0x00000803 for [n, 28, 28] images, 0x00000801 for labels),
    gzipped without a timestamp, so their bytes are reproducible.

Split (fixed, independent of any seed; the package ships no split of its own):
  the package holds 1,000 images per class. Within each class, in the package's order, the
  held-out (t10k) images are the LAST 100 images whose pixels occur exactly once in the whole
  package; all others go to train. The package contains 284 pairs of byte-identical images
  (always within one class); choosing only unique images for t10k keeps every exact duplicate
  of a held-out image out of train. Both splits are written class-interleaved (round robin:
  class 0, 1, ..., 9, 0, 1, ...), so any prefix of a file (e.g. `max_train`) is class-balanced.

Polarity: the package already stores bright silhouettes (255) on a black background (0), like
MNIST and Fashion-MNIST; the script checks the border pixels and would invert otherwise.

Idempotent: when every output exists and matches `checksums.sha256`, and SOURCE.txt describes
the same recipe, it prints "up to date" and exits 0 without touching the network. Otherwise it
rewrites everything atomically (temporary files, then rename; the checksum file goes last).
"""

import argparse
import collections
import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "animal-mnist"
VERSION = "0.4"
WHEEL_NAME = "animal_mnist-0.4-py3-none-any.whl"
WHEEL_SHA256 = "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce"
DATA_MEMBER = "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz"
LABEL_MEMBER = "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz"
# Label order: the package's METADATA lists "Bear, Bird, Cat, Cow, Dog, Elephant, Giraffe,
# Horse, Sheep, Zebra" (alphabetical); the package has no other name table.
CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
SIDE = 28
PER_CLASS = 1000
TEST_PER_CLASS = 100
RECIPE = "prepare_animal_mnist.py recipe 1"

OUTPUTS = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "classes.txt",
    "SOURCE.txt",
]
CHECKSUMS = "checksums.sha256"


class PrepError(Exception):
    """An expected failure: reported as one line, no traceback."""


# ---------------------------------------------------------------------------------------------
# Reading the numpy pickles without numpy


class _DType:
    """Stands in for numpy.dtype(name, align, copy) + __setstate__."""

    def __init__(self, name, *_args):
        self.name = name
        self.byteorder = "|"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) >= 2:
            self.byteorder = state[1]


class _NDArray:
    """Stands in for numpy.core.multiarray._reconstruct(ndarray, ...) + __setstate__."""

    shape = None
    dtype = None
    fortran = False
    raw = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise PrepError(f"unexpected ndarray pickle state ({type(state).__name__})")
        _version, self.shape, self.dtype, self.fortran, self.raw = state


def _ndarray_marker():
    raise PrepError("unexpected direct ndarray construction in pickle")


def _reconstruct(_cls, _shape, _typecode):
    return _NDArray()


class _RestrictedUnpickler(pickle.Unpickler):
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): _ndarray_marker,
        ("numpy", "dtype"): _DType,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise PrepError(f"pickle refers to {module}.{name}; only plain numpy arrays are expected")


def load_array(wheel, member):
    """Returns (shape, dtype name, byteorder, raw bytes) of the ndarray pickled in `member`."""
    try:
        packed = wheel.read(member)
    except KeyError:
        raise PrepError(f"{member} is missing from the wheel")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(gzip.decompress(packed))).load()
    except PrepError:
        raise
    except Exception as e:  # corrupt gzip or pickle
        raise PrepError(f"{member}: cannot read it as a gzipped numpy pickle ({e})")
    if not isinstance(obj, _NDArray) or not isinstance(obj.dtype, _DType):
        raise PrepError(f"{member}: expected one numpy array, found {type(obj).__name__}")
    if not isinstance(obj.raw, (bytes, bytearray)):
        raise PrepError(f"{member}: array data is not raw bytes (object array?)")
    if obj.fortran and len(obj.shape) > 1:
        raise PrepError(f"{member}: Fortran-ordered array, expected C order")
    return tuple(obj.shape), obj.dtype.name, obj.dtype.byteorder, bytes(obj.raw)


def decode_images(shape, dtype, _byteorder, raw):
    want = (PER_CLASS * len(CLASSES), SIDE, SIDE)
    if shape != want or dtype not in ("u1", "uint8") or len(raw) != want[0] * SIDE * SIDE:
        raise PrepError(
            f"unexpected image array: shape {shape}, dtype {dtype}, {len(raw)} bytes; "
            f"expected shape {want} uint8"
        )
    return raw


def decode_labels(shape, dtype, byteorder, raw):
    n = PER_CLASS * len(CLASSES)
    codes = {"i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "i8": "q", "u8": "Q"}
    if shape != (n,) or dtype not in codes:
        raise PrepError(f"unexpected label array: shape {shape}, dtype {dtype}; expected ({n},) integers")
    order = {"<": "<", ">": ">", "|": "<", "=": "<" if sys.byteorder == "little" else ">"}.get(byteorder)
    if order is None or len(raw) != n * struct.calcsize("<" + codes[dtype]):
        raise PrepError(f"unexpected label array: byte order {byteorder!r}, {len(raw)} bytes")
    labels = list(struct.unpack(f"{order}{n}{codes[dtype]}", raw))
    bad = [x for x in labels if not 0 <= x < len(CLASSES)]
    if bad:
        raise PrepError(f"label {bad[0]} out of range 0..{len(CLASSES) - 1}")
    counts = collections.Counter(labels)
    if any(counts[c] != PER_CLASS for c in range(len(CLASSES))):
        raise PrepError(f"expected {PER_CLASS} images per class, found {dict(sorted(counts.items()))}")
    return labels


# ---------------------------------------------------------------------------------------------
# Fetching


def download_wheel(tmpdir):
    spec = f"{PACKAGE}=={VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--ignore-requires-python", "--disable-pip-version-check", spec, "-d", tmpdir]
    print(f"downloading {spec}: {' '.join(cmd[1:])}", flush=True)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise PrepError(f"cannot run pip ({e})")
    if proc.returncode != 0:
        err = [l.strip() for l in proc.stderr.splitlines() if l.strip()]
        out = [l.strip() for l in proc.stdout.splitlines() if l.strip()]
        errors = [l for l in err if l.startswith("ERROR:")]
        last = (errors or err[-1:] or out[-1:] or ["no output"])[0]
        raise PrepError(
            f"pip download {spec} failed (exit {proc.returncode}: {last}); PyPI or the configured "
            f"pip index must be reachable, or pass --wheel with a downloaded {WHEEL_NAME}"
        )
    wheels = sorted(Path(tmpdir).glob("*.whl"))
    if len(wheels) != 1:
        raise PrepError(f"pip download left {len(wheels)} wheels in {tmpdir}, expected 1")
    return wheels[0]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Conversion


def ascii_image(pixels, index):
    ramp = " .:-=+*#%@"
    img = pixels[index * SIDE * SIDE:(index + 1) * SIDE * SIDE]
    return "\n".join(
        "|" + "".join(ramp[img[r * SIDE + c] * len(ramp) // 256] for c in range(SIDE)) + "|"
        for r in range(SIDE)
    )


def fix_polarity(pixels):
    """Returns (pixels with a dark background, message)."""
    n = len(pixels) // (SIDE * SIDE)
    total = count = 0
    for k in range(n):
        base = k * SIDE * SIDE
        for i in range(SIDE):
            total += pixels[base + i] + pixels[base + (SIDE - 1) * SIDE + i]
            total += pixels[base + i * SIDE] + pixels[base + i * SIDE + SIDE - 1]
            count += 4
    mean = total / count
    if mean > 127.5:
        inverted = pixels.translate(bytes(255 - v for v in range(256)))
        return inverted, f"polarity: border mean {mean:.1f} (bright background) -> inverted to bright-on-dark"
    return pixels, f"polarity: border mean {mean:.1f} (dark background, bright silhouettes) -> kept as is"


def split_indices(pixels, labels):
    """Fixed split; see the module docstring. Returns (train, test) index lists, class-interleaved."""
    size = SIDE * SIDE
    seen = collections.Counter(pixels[k * size:(k + 1) * size] for k in range(len(labels)))
    train_by_class, test_by_class = [], []
    for c in range(len(CLASSES)):
        members = [k for k, y in enumerate(labels) if y == c]
        test = []
        for k in reversed(members):
            if len(test) == TEST_PER_CLASS:
                break
            if seen[pixels[k * size:(k + 1) * size]] == 1:
                test.append(k)
        if len(test) < TEST_PER_CLASS:
            raise PrepError(f"class {CLASSES[c]}: only {len(test)} unique images for the held-out split")
        chosen = set(test)
        test_by_class.append(sorted(test))
        train_by_class.append([k for k in members if k not in chosen])
    duplicates = sum(v for v in seen.values() if v > 1)
    interleave = lambda groups: [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
    return interleave(train_by_class), interleave(test_by_class), duplicates


def idx_bytes(dims, body):
    magic = 0x00000800 | len(dims)
    return struct.pack(f">I{len(dims)}I", magic, *dims) + body


def gzip_bytes(data):
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=6, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def source_text():
    return (
        f"Animal-MNIST, converted to MNIST-style IDX files by scripts/prepare_animal_mnist.py\n"
        f"\n"
        f"Source:   PyPI package {PACKAGE} {VERSION} ({WHEEL_NAME}, sha256 {WHEEL_SHA256})\n"
        f"          files {DATA_MEMBER} (uint8 [10000, 28, 28])\n"
        f"          and {LABEL_MEMBER} (int64 [10000]), gzipped numpy pickles\n"
        f"Author:   Sina Mohammadi (SinaSR-6), 2025\n"
        f"Licence:  MIT (the package's LICENSE: \"Copyright (c) 2025 SinaSR-6\")\n"
        f"Content:  10,000 28x28 grayscale animal silhouettes, 1,000 per class; labels 0-9 =\n"
        f"          {', '.join(CLASSES)}\n"
        f"          (order from the package METADATA, which lists the classes alphabetically)\n"
        f"Pixels:   as stored by the package: 0 = background, 255 = silhouette (MNIST polarity)\n"
        f"Split:    the package ships no train/test split. Fixed, seed-independent rule: within each\n"
        f"          class, in the package's order, t10k = the last {TEST_PER_CLASS} images whose pixels occur\n"
        f"          exactly once in the package (so no exact duplicate of a held-out image is in\n"
        f"          train); train = all other images. train: {PER_CLASS - TEST_PER_CLASS} per class, "
        f"{(PER_CLASS - TEST_PER_CLASS) * len(CLASSES)} images;\n"
        f"          t10k: {TEST_PER_CLASS} per class, {TEST_PER_CLASS * len(CLASSES)} images.\n"
        f"Order:    both splits class-interleaved (class 0, 1, ..., 9, 0, 1, ...), keeping the package's\n"
        f"          order within a class, so every prefix is class-balanced.\n"
        f"Format:   IDX uint8, magic 0x00000803 [n, 28, 28] / 0x00000801 [n], gzip without timestamp.\n"
        f"Recipe:   {RECIPE}\n"
    )


def build_outputs(wheel_path, preview):
    digest = sha256_file(wheel_path)
    if digest != WHEEL_SHA256:
        raise PrepError(
            f"{wheel_path}: sha256 {digest} differs from the pinned {PACKAGE} {VERSION} wheel ({WHEEL_SHA256})"
        )
    try:
        wheel = zipfile.ZipFile(wheel_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise PrepError(f"{wheel_path}: not a readable wheel ({e})")
    with wheel:
        pixels = decode_images(*load_array(wheel, DATA_MEMBER))
        labels = decode_labels(*load_array(wheel, LABEL_MEMBER))
    print(f"read {len(labels)} images of {SIDE}x{SIDE} uint8 and {len(labels)} labels from {wheel_path.name}")

    pixels, message = fix_polarity(pixels)
    print(message)
    for k in range(min(preview, len(CLASSES))):
        index = labels.index(k)
        print(f"image {index} (label {k}, {CLASSES[k]}):\n{ascii_image(pixels, index)}")

    train, test, duplicates = split_indices(pixels, labels)
    print(f"{duplicates} images in the package have a byte-identical twin; none of them is held out")
    size = SIDE * SIDE
    outputs = {}
    for prefix, indices in (("train", train), ("t10k", test)):
        images = b"".join(pixels[k * size:(k + 1) * size] for k in indices)
        outputs[f"{prefix}-images-idx3-ubyte.gz"] = gzip_bytes(idx_bytes([len(indices), SIDE, SIDE], images))
        outputs[f"{prefix}-labels-idx1-ubyte.gz"] = gzip_bytes(
            idx_bytes([len(indices)], bytes(labels[k] for k in indices))
        )
    outputs["classes.txt"] = ("\n".join(CLASSES) + "\n").encode()
    outputs["SOURCE.txt"] = source_text().encode()
    counts = {
        "train": collections.Counter(labels[k] for k in train),
        "t10k": collections.Counter(labels[k] for k in test),
    }
    return outputs, counts


# ---------------------------------------------------------------------------------------------
# Output folder


def read_checksums(out):
    path = out / CHECKSUMS
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    sums = {}
    for line in lines:
        parts = line.split(None, 1)
        if len(parts) != 2:
            return None
        sums[parts[1].lstrip("*")] = parts[0]
    return sums


def up_to_date(out):
    sums = read_checksums(out)
    if sums is None or set(sums) != set(OUTPUTS):
        return False
    try:
        if (out / "SOURCE.txt").read_bytes() != source_text().encode():
            return False  # made by another recipe
        return all(sha256_file(out / name) == sums[name] for name in OUTPUTS)
    except OSError:
        return False


def write_atomically(out, outputs):
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / CHECKSUMS).unlink(missing_ok=True)  # never "up to date" while half written
        checksum_text = "".join(f"{hashlib.sha256(outputs[n]).hexdigest()}  {n}\n" for n in OUTPUTS)
        for name, data in list(outputs.items()) + [(CHECKSUMS, checksum_text.encode())]:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, out / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except OSError as e:
        raise PrepError(f"cannot write to {out}: {e}")


def print_summary(out, counts):
    print(f"Animal-MNIST IDX files in {out}:")
    for name in OUTPUTS + [CHECKSUMS]:
        print(f"  {name:28} {(out / name).stat().st_size:>9} bytes")
    for split, c in counts.items():
        per = ", ".join(f"{CLASSES[k]} {c[k]}" for k in range(len(CLASSES)))
        print(f"  {split:5} {sum(c.values()):>5} images: {per}")


def counts_from_files(out):
    counts = {}
    for split in ("train", "t10k"):
        data = gzip.decompress((out / f"{split}-labels-idx1-ubyte.gz").read_bytes())
        counts[split] = collections.Counter(data[8:])
    return counts


def main():
    repo = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=repo / "data" / "animal-mnist",
                        help="output folder (default: data/animal-mnist in the repository)")
    parser.add_argument("--wheel", type=Path, help=f"use this {WHEEL_NAME} instead of downloading it")
    parser.add_argument("--preview", type=int, default=0, metavar="N",
                        help="print the first image of the first N classes as ASCII art (implies a rebuild)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args()
    out = args.out.resolve()
    start = time.monotonic()
    try:
        if not args.force and args.preview == 0 and up_to_date(out):
            print(f"up to date: {out} matches {CHECKSUMS}")
            print_summary(out, counts_from_files(out))
            return 0
        if args.wheel is not None:
            if not args.wheel.is_file():
                raise PrepError(f"--wheel {args.wheel}: no such file")
            outputs, counts = build_outputs(args.wheel, args.preview)
        else:
            with tempfile.TemporaryDirectory(prefix="animal-mnist-") as tmpdir:
                outputs, counts = build_outputs(download_wheel(tmpdir), args.preview)
        write_atomically(out, outputs)
        print_summary(out, counts)
        print(f"done in {time.monotonic() - start:.1f} s")
        return 0
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
