"""Omniglot (Lake et al., 2015): find or download the two official zips, check their structure,
preprocess once into a 28x28 uint8 cache that later loads memory-map, and build character splits.

Splits are over characters; rotating characters into extra classes is the task sampler's job."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import urllib.request
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from distmeta.data.sampling import SPLITS

log = logging.getLogger("distmeta.data")

OMNIGLOT_SOURCES: dict[str, tuple[str, str]] = {
    "images_background.zip": (
        "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
        "68d2efa1b9178cc56df9314c21c6e718",
    ),
    "images_evaluation.zip": (
        "https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip",
        "6b91aef0f799c5bb55b94e3f2daec811",
    ),
}
SOURCE_ENV = "DISTMETA_OMNIGLOT"
CACHE_ENV = "DISTMETA_CACHE"
PARTS = ("images_background", "images_evaluation")  # background characters come first
EXPECTED_CHARACTERS = {"images_background": 964, "images_evaluation": 659}  # tests shrink this
DRAWINGS_PER_CHARACTER = 20
RAW_IMAGE_SIZE = (105, 105)
IMAGE_SIZE = 28
PREPROCESS_VERSION = 1  # bump when the decoding/resizing below changes, so old caches are ignored
VINYALS_TRAIN_CHARACTERS = 1200
PROTOCOLS = ("vinyals", "alphabet")


class DataError(ValueError):
    """Raw or cached data is missing, corrupt or shaped unexpectedly; the message says what and where."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing/hashing numpy fields is ill-defined
class Omniglot:
    """All 1623 characters: background ones first, then evaluation, each sorted by (alphabet, character)."""

    images: np.ndarray  # uint8 (characters, 20, 28, 28), ink = 255; usually a read-only np.memmap
    alphabets: tuple[str, ...]  # per character, its alphabet folder name
    characters: tuple[str, ...]  # per character, "Alphabet/characterNN"
    background: np.ndarray  # bool (characters,), True for characters from images_background.zip
    sha256: str  # of the pixels, as the cache recorded and checked it


def default_cache_dir() -> Path:
    """Where preprocessed data lives: $DISTMETA_CACHE, else ~/.cache/distmeta."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "distmeta")


def _download(url: str, destination: Path) -> None:
    """Stream url into destination; the only network access of this module (tests replace it)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as handle:
        while chunk := response.read(1 << 20):
            handle.write(chunk)


def _file_md5(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def _ensure_downloaded(raw_dir: Path, download: bool) -> None:
    """Fetch missing official zips into raw_dir; md5 is checked on the downloaded bytes before they land."""
    for part in PARTS:
        zip_name = f"{part}.zip"
        if (raw_dir / zip_name).exists() or (raw_dir / part).is_dir():
            continue
        url, md5 = OMNIGLOT_SOURCES[zip_name]
        how_to_fix = f"download {url} yourself and set {SOURCE_ENV} to the folder holding both zips"
        if not download:
            raise DataError(f"Omniglot: {raw_dir / zip_name} is missing and download=False; {how_to_fix}")
        raw_dir.mkdir(parents=True, exist_ok=True)
        partial = raw_dir / f"{zip_name}.part{os.getpid()}"
        try:
            log.info("downloading %s to %s", url, raw_dir)
            try:
                _download(url, partial)
            except OSError as error:  # urllib's URLError/HTTPError are OSErrors
                raise DataError(f"Omniglot: could not download {url} ({error}); {how_to_fix}") from error
            actual = _file_md5(partial)
            if actual != md5:
                raise DataError(f"Omniglot: {url} downloaded with md5 {actual}, expected {md5}; {how_to_fix}")
            os.replace(partial, raw_dir / zip_name)
        finally:
            partial.unlink(missing_ok=True)


def _resolve_source(source: str | os.PathLike | None, cache_dir: Path, download: bool) -> Path:
    """Argument > $DISTMETA_OMNIGLOT > <cache>/omniglot/raw (downloaded there on demand)."""
    if source is not None:
        root, origin = Path(source), "data.omniglot"
    elif os.environ.get(SOURCE_ENV):
        root, origin = Path(os.environ[SOURCE_ENV]), f"${SOURCE_ENV}"
    else:
        root = cache_dir / "omniglot" / "raw"
        _ensure_downloaded(root, download)
        return root
    if not root.exists():
        raise DataError(f"Omniglot: {origin} {root} does not exist")
    if not root.is_dir():
        raise DataError(f"Omniglot: {origin} {root} is not a directory (it should hold the two zips or their folders)")
    return root


def _part_location(root: Path, part: str) -> Path:
    """The part's zip if present, else its extracted top folder: both layouts are in common use."""
    for candidate in (root / f"{part}.zip", root / part):
        if candidate.exists():
            return candidate
    raise DataError(f"Omniglot: neither {root / f'{part}.zip'} nor folder {root / part} exists")


def _fingerprint(locations: dict[str, Path]) -> str:
    """Identifies the source so a cache built from other data is never reused."""
    digest = hashlib.sha256()
    for part, location in locations.items():
        digest.update(part.encode())
        if location.is_dir():
            for path in sorted(location.rglob("*.png")):
                digest.update(f"{path.relative_to(location).as_posix()}\t{path.stat().st_size}\n".encode())
        else:
            with open(location, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


def _read_part(location: Path, part: str) -> dict[str, bytes]:
    """PNG bytes keyed by "Alphabet/characterNN/file.png" (~15 MB for all of Omniglot, so keep it in memory)."""
    prefix = f"{part}/"
    try:
        if location.is_dir():
            return {
                path.relative_to(location).as_posix(): path.read_bytes() for path in location.rglob("*.png")
            }
        with zipfile.ZipFile(location) as archive:
            return {
                info.filename.removeprefix(prefix): archive.read(info)
                for info in archive.infolist()
                if info.filename.startswith(prefix) and info.filename.endswith(".png")
            }
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise DataError(f"Omniglot: could not read {location} ({error})") from error


def _group_characters(pngs: dict[str, bytes], location: Path, part: str) -> dict[str, list[str]]:
    """Sorted "Alphabet/characterNN" -> its sorted drawing paths, after checking the counts splits rely on."""
    drawings: dict[str, list[str]] = {}
    for path in pngs:
        if path.count("/") != 2:
            raise DataError(
                f"Omniglot: unexpected file {part}/{path} in {location}, expected Alphabet/characterNN/*.png"
            )
        drawings.setdefault(path.rsplit("/", 1)[0], []).append(path)
    if not drawings:
        raise DataError(f"Omniglot: {location} holds no PNG files under {part}/")
    expected = EXPECTED_CHARACTERS[part]
    if len(drawings) != expected:
        raise DataError(
            f"Omniglot: {location} has {len(drawings)} characters under {part}/, expected {expected}"
        )
    for character, paths in drawings.items():
        if len(paths) != DRAWINGS_PER_CHARACTER:
            raise DataError(
                f"Omniglot: character {part}/{character} in {location} has {len(paths)} drawings, "
                f"expected {DRAWINGS_PER_CHARACTER}"
            )
    return {
        character: sorted(drawings[character]) for character in sorted(drawings, key=lambda c: c.split("/"))
    }


def _decode(png: bytes, name: str) -> np.ndarray:
    """105x105 1-bit drawing -> 28x28 uint8 with ink high (the PNGs store ink as 0)."""
    try:
        with Image.open(io.BytesIO(png)) as image:
            size = image.size
            small = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    except (OSError, SyntaxError, ValueError, zlib.error) as error:
        raise DataError(f"Omniglot: {name} is not a readable PNG ({error})") from error
    if size != RAW_IMAGE_SIZE:
        raise DataError(
            f"Omniglot: {name} is {size[0]}x{size[1]}, expected {RAW_IMAGE_SIZE[0]}x{RAW_IMAGE_SIZE[1]}"
        )
    return 255 - np.asarray(small, dtype=np.uint8)


def _preprocess(locations: dict[str, Path]) -> tuple[np.ndarray, dict[str, list]]:
    """Decode every drawing once; returns the image array and the JSON index describing its rows."""
    started = time.perf_counter()
    log.info("preprocessing Omniglot from %s", ", ".join(map(str, locations.values())))
    parts: dict[str, tuple[dict[str, bytes], dict[str, list[str]]]] = {}
    for part, location in locations.items():
        pngs = _read_part(location, part)
        parts[part] = (pngs, _group_characters(pngs, location, part))  # validate everything before decoding
    images, index = [], {"alphabets": [], "characters": [], "background": []}
    for part, (pngs, characters) in parts.items():
        for character, paths in characters.items():
            images.append([_decode(pngs[path], f"{locations[part]}:{part}/{path}") for path in paths])
            index["alphabets"].append(character.split("/")[0])
            index["characters"].append(character)
            index["background"].append(part == "images_background")
    log.info("preprocessed %d characters in %.1f s", len(images), time.perf_counter() - started)
    array = np.asarray(images, dtype=np.uint8)
    index["images_sha256"] = _digest(array)
    return array, index


def _digest(images: np.ndarray) -> str:
    """sha256 of the pixels, recorded in the cache's index and checked at every load: a cache
    damaged in place (same size, other bytes) is rebuilt instead of training on it."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(images)).cast("B")).hexdigest()


def _write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Readers (other processes too) see either no file or a complete one, never a partial write."""
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _load_cache(images_path: Path, index_path: Path) -> Omniglot | None:
    """The cached dataset, or None when it is absent or fails the shape/dtype/index checks."""
    if not (images_path.exists() and index_path.exists()):
        return None
    try:
        index = json.loads(index_path.read_text())
        images = np.load(images_path, mmap_mode="r", allow_pickle=False)
        count = sum(EXPECTED_CHARACTERS.values())
        expected_shape = (count, DRAWINGS_PER_CHARACTER, IMAGE_SIZE, IMAGE_SIZE)
        if images.dtype != np.uint8 or images.shape != expected_shape:
            raise ValueError(f"array is {images.dtype} {images.shape}, expected uint8 {expected_shape}")
        if not all(len(index[key]) == count for key in ("alphabets", "characters", "background")):
            raise ValueError(f"index does not describe {count} characters")
        if sum(index["background"]) != EXPECTED_CHARACTERS["images_background"]:
            raise ValueError(f"index marks {sum(index['background'])} background characters, "
                             f"expected {EXPECTED_CHARACTERS['images_background']}")
        if "images_sha256" not in index:
            raise ValueError("its index has no pixel checksum (written by an older distmeta)")
        if index["images_sha256"] != _digest(images):
            raise ValueError("its pixels do not match the sha256 recorded when it was written")
    except (OSError, ValueError, KeyError, TypeError, EOFError) as error:
        log.warning("Omniglot cache %s is unusable (%s); rebuilding it", images_path, error)
        return None
    return Omniglot(
        images=images,
        alphabets=tuple(index["alphabets"]),
        characters=tuple(index["characters"]),
        background=np.asarray(index["background"], dtype=bool),
        sha256=index["images_sha256"],
    )


def load_omniglot(
    source: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, download: bool = True
) -> Omniglot:
    """Omniglot at 28x28, ink high, memory-mapped from a cache built on first use.

    source: folder holding images_background.zip and images_evaluation.zip, or their extracted top
    folders; defaults to $DISTMETA_OMNIGLOT, then <cache_dir>/omniglot/raw (downloaded if download).
    cache_dir defaults to $DISTMETA_CACHE, then ~/.cache/distmeta.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = _resolve_source(source, cache, download)
    locations = {part: _part_location(root, part) for part in PARTS}
    stem = f"omniglot{IMAGE_SIZE}_v{PREPROCESS_VERSION}_{_fingerprint(locations)}"
    images_path, index_path = cache / "omniglot" / f"{stem}.npy", cache / "omniglot" / f"{stem}.json"
    cached = _load_cache(images_path, index_path)
    if cached is not None:
        return cached
    images, index = _preprocess(locations)
    images_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(images_path, lambda handle: np.save(handle, images, allow_pickle=False))
    _write_atomically(index_path, lambda handle: handle.write(json.dumps(index).encode()))
    loaded = _load_cache(images_path, index_path)
    if loaded is None:
        raise DataError(f"Omniglot: cache {images_path} failed its checks right after being written")
    return loaded


def _vinyals_splits(num_characters: int, num_val_characters: int, seed: int) -> dict[str, np.ndarray]:
    if num_characters <= VINYALS_TRAIN_CHARACTERS:
        raise ValueError(
            f"vinyals protocol needs more than {VINYALS_TRAIN_CHARACTERS} characters, got {num_characters}"
        )
    if not 0 <= num_val_characters < VINYALS_TRAIN_CHARACTERS:
        raise ValueError(
            f"num_val_characters must be in [0, {VINYALS_TRAIN_CHARACTERS}), got {num_val_characters}"
        )
    order = np.random.default_rng(seed).permutation(num_characters)
    num_train = VINYALS_TRAIN_CHARACTERS - num_val_characters
    return {
        "train": order[:num_train],
        "val": order[num_train:VINYALS_TRAIN_CHARACTERS],
        "test": order[VINYALS_TRAIN_CHARACTERS:],
    }


def _alphabet_splits(data: Omniglot, num_val_characters: int, seed: int) -> dict[str, np.ndarray]:
    num_background = int(data.background.sum())
    if not 0 <= num_val_characters < num_background:
        raise ValueError(f"num_val_characters must be in [0, {num_background}), got {num_val_characters}")
    alphabets = np.asarray(data.alphabets)
    sizes = Counter(alphabets[data.background].tolist())
    names = sorted(sizes)
    val_alphabets: list[str] = []
    for position in np.random.default_rng(seed).permutation(len(names)):
        if sum(sizes[name] for name in val_alphabets) >= num_val_characters:
            break
        val_alphabets.append(names[position])
    is_val = data.background & np.isin(alphabets, val_alphabets)
    return {
        "train": np.flatnonzero(data.background & ~is_val),
        "val": np.flatnonzero(is_val),
        "test": np.flatnonzero(~data.background),
    }


def omniglot_split(
    data: Omniglot, protocol: str, split: str, num_val_characters: int = 100, seed: int = 0
) -> np.ndarray:
    """Sorted int64 character indices of one split; the three splits of a protocol are disjoint.

    "vinyals" (MAML, Vinyals et al.): all characters pooled and shuffled by seed; the first 1200 are
    meta-train, of which the last num_val_characters are "val", and the other 423 are "test".
    "alphabet" (original, harder): "test" is the evaluation zip; "val" is whole background alphabets,
    drawn in a seeded random order until they hold at least num_val_characters; "train" the rest.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown Omniglot split {split!r}; expected one of {SPLITS}")
    if protocol == "vinyals":
        splits = _vinyals_splits(len(data.characters), num_val_characters, seed)
    elif protocol == "alphabet":
        splits = _alphabet_splits(data, num_val_characters, seed)
    else:
        raise ValueError(f"unknown Omniglot protocol {protocol!r}; expected one of {PROTOCOLS}")
    return np.sort(splits[split]).astype(np.int64)
