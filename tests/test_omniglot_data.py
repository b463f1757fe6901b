"""Omniglot loading: the real data (skipped when absent), structure validation on tiny fake zips,
the md5-checked download path, source/cache resolution and rebuilding a corrupt cache."""

import hashlib
import io
import json
import logging
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from distmeta.data import omniglot
from distmeta.data.omniglot import (
    OMNIGLOT_SOURCES,
    DataError,
    Omniglot,
    load_omniglot,
    omniglot_split,
)

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"

# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not all((REAL_DATA / f"{part}.zip").exists() for part in omniglot.PARTS):
        pytest.skip(f"real Omniglot zips not found in {REAL_DATA}")
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="session")
def real_omniglot(real_cache: Path) -> Omniglot:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(omniglot.SOURCE_ENV, str(REAL_DATA))
        patch.setenv(omniglot.CACHE_ENV, str(real_cache))
        return load_omniglot()


def test_real_data_shapes_order_and_ink(real_omniglot: Omniglot) -> None:
    data = real_omniglot
    assert data.images.shape == (1623, 20, 28, 28) and data.images.dtype == np.uint8
    assert data.images.max() == 255 and data.images.mean() < 64  # ink is high and sparse
    assert data.background.dtype == bool and data.background[:964].all() and not data.background[964:].any()
    assert len(data.characters) == len(data.alphabets) == 1623 and len(set(data.characters)) == 1623
    assert len(set(data.alphabets)) == 50
    assert data.characters[0] == "Alphabet_of_the_Magi/character01" and data.characters[964] == "Angelic/character01"
    braille = data.characters.index("Braille/character01")  # drawings 03 and 19 are identical in the source
    assert np.array_equal(data.images[braille, 2], data.images[braille, 18])
    assert not np.array_equal(data.images[braille, 0], data.images[braille, 2])


def test_real_data_second_load_reuses_memmapped_cache(
    real_omniglot: Omniglot, real_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(omniglot.SOURCE_ENV, str(REAL_DATA))
    monkeypatch.setattr(omniglot, "_preprocess", lambda locations: pytest.fail("cache was not reused"))
    started = time.perf_counter()
    again = load_omniglot(cache_dir=real_cache)
    assert time.perf_counter() - started < 2.0
    assert isinstance(again.images, np.memmap) and not again.images.flags.writeable
    assert np.array_equal(again.images, real_omniglot.images)
    assert again.characters == real_omniglot.characters and again.alphabets == real_omniglot.alphabets
    assert np.array_equal(again.background, real_omniglot.background)
    assert len(list((real_cache / "omniglot").glob("*.npy"))) == 1


def splits_of(data: Omniglot, protocol: str, **kwargs) -> dict[str, np.ndarray]:
    return {split: omniglot_split(data, protocol, split, **kwargs) for split in omniglot.SPLITS}


def assert_disjoint_cover(splits: dict[str, np.ndarray], pool: np.ndarray) -> None:
    for indices in splits.values():
        assert indices.dtype == np.int64 and np.all(np.diff(indices) > 0)
    assert np.array_equal(np.sort(np.concatenate(list(splits.values()))), pool)


def test_vinyals_split(real_omniglot: Omniglot) -> None:
    splits = splits_of(real_omniglot, "vinyals")
    assert [len(splits[name]) for name in omniglot.SPLITS] == [1100, 100, 423]
    assert_disjoint_cover(splits, np.arange(1623))
    again = splits_of(real_omniglot, "vinyals")
    assert all(np.array_equal(splits[name], again[name]) for name in omniglot.SPLITS)
    assert not np.array_equal(splits["test"], omniglot_split(real_omniglot, "vinyals", "test", seed=1))
    assert len(omniglot_split(real_omniglot, "vinyals", "val", num_val_characters=200)) == 200
    assert len(omniglot_split(real_omniglot, "vinyals", "train", num_val_characters=0)) == 1200


def test_alphabet_split(real_omniglot: Omniglot) -> None:
    data = real_omniglot
    splits = splits_of(data, "alphabet")
    assert np.array_equal(splits["test"], np.arange(964, 1623))
    assert len(splits["val"]) >= 100 and len(splits["train"]) + len(splits["val"]) == 964
    assert_disjoint_cover(splits, np.arange(1623))
    alphabets = {name: {data.alphabets[i] for i in indices} for name, indices in splits.items()}
    assert not alphabets["train"] & alphabets["val"]  # whole alphabets are held out
    assert len(alphabets["train"] | alphabets["val"]) == 30 and len(alphabets["test"]) == 20
    assert np.array_equal(splits["val"], omniglot_split(data, "alphabet", "val"))


def test_unknown_protocol_or_split(real_omniglot: Omniglot) -> None:
    with pytest.raises(ValueError, match="protocol 'lake'.*vinyals"):
        omniglot_split(real_omniglot, "lake", "train")
    with pytest.raises(ValueError, match="split 'valid'.*train"):
        omniglot_split(real_omniglot, "vinyals", "valid")
    with pytest.raises(ValueError, match="num_val_characters"):
        omniglot_split(real_omniglot, "vinyals", "val", num_val_characters=1200)


# --------------------------------------------------------------------------- tiny fake data

FAKE_BACKGROUND = {"Beta/character01": 20, "Alpha/character02": 20, "Alpha/character01": 20}
FAKE_EVALUATION = {"Gamma/character02": 20, "Gamma/character01": 20}


def drawing_png(drawing: int, size: tuple[int, int] = (105, 105)) -> bytes:
    """An ink square in the top-left corner whose side grows with the drawing number."""
    image = Image.new("1", size, 1)
    ImageDraw.Draw(image).rectangle((5, 5, 20 + drawing, 20 + drawing), fill=0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_zip(path: Path, part: str, drawings: dict[str, int], size: tuple[int, int] = (105, 105)) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for number, (character, count) in enumerate(drawings.items(), start=1):
            for drawing in reversed(range(1, count + 1)):  # stored out of order: the loader must sort
                archive.writestr(f"{part}/{character}/{number:04d}_{drawing:02d}.png", drawing_png(drawing, size))


def write_fake_source(folder: Path, background: dict[str, int] = FAKE_BACKGROUND, **kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_zip(folder / "images_background.zip", "images_background", background, **kwargs)
    write_zip(folder / "images_evaluation.zip", "images_evaluation", FAKE_EVALUATION, **kwargs)
    return folder


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny valid source in tmp_path/raw, with the expected counts shrunk to match and no env overrides."""
    monkeypatch.setattr(omniglot, "EXPECTED_CHARACTERS", {"images_background": 3, "images_evaluation": 2})
    monkeypatch.delenv(omniglot.SOURCE_ENV, raising=False)
    monkeypatch.delenv(omniglot.CACHE_ENV, raising=False)
    return write_fake_source(tmp_path / "raw")


def test_fake_source_loads_sorted_and_inverted(fake: Path, tmp_path: Path) -> None:
    data = load_omniglot(fake, cache_dir=tmp_path / "cache")
    assert data.images.shape == (5, 20, 28, 28) and data.images.dtype == np.uint8
    assert data.characters == (
        "Alpha/character01", "Alpha/character02", "Beta/character01", "Gamma/character01", "Gamma/character02"
    )
    assert data.alphabets == ("Alpha", "Alpha", "Beta", "Gamma", "Gamma")
    assert data.background.tolist() == [True, True, True, False, False]
    assert data.images[:, :, 2:5, 2:5].min() > 200 and data.images[:, :, 14:, 14:].max() < 10  # ink is high
    ink_per_drawing = data.images.astype(np.int64).sum(axis=(0, 2, 3))
    assert np.all(np.diff(ink_per_drawing) > 0)  # drawings sorted by file name


def test_extracted_folders_load_like_zips(fake: Path, tmp_path: Path) -> None:
    extracted = tmp_path / "extracted"
    for part in omniglot.PARTS:
        with zipfile.ZipFile(fake / f"{part}.zip") as archive:
            archive.extractall(extracted)
    from_zips = load_omniglot(fake, cache_dir=tmp_path / "cache")
    from_folders = load_omniglot(extracted, cache_dir=tmp_path / "cache")
    assert np.array_equal(from_zips.images, from_folders.images)
    assert from_zips.characters == from_folders.characters
    assert len(list((tmp_path / "cache" / "omniglot").glob("*.npy"))) == 2  # different sources, different caches


def test_missing_zip(fake: Path, tmp_path: Path) -> None:
    (fake / "images_evaluation.zip").unlink()
    with pytest.raises(DataError, match="images_evaluation.zip nor folder"):
        load_omniglot(fake, cache_dir=tmp_path / "cache")


def test_corrupt_zip(fake: Path, tmp_path: Path) -> None:
    (fake / "images_background.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DataError, match="could not read .*images_background.zip"):
        load_omniglot(fake, cache_dir=tmp_path / "cache")


def test_character_with_19_drawings(fake: Path, tmp_path: Path) -> None:
    write_fake_source(fake, background={**FAKE_BACKGROUND, "Alpha/character02": 19})
    with pytest.raises(DataError, match="character images_background/Alpha/character02 .* has 19 drawings"):
        load_omniglot(fake, cache_dir=tmp_path / "cache")


def test_wrong_character_count(fake: Path, tmp_path: Path) -> None:
    write_fake_source(fake, background={"Alpha/character01": 20, "Alpha/character02": 20})
    with pytest.raises(DataError, match="2 characters under images_background/, expected 3"):
        load_omniglot(fake, cache_dir=tmp_path / "cache")


def test_wrong_image_size(fake: Path, tmp_path: Path) -> None:
    write_fake_source(fake, size=(50, 50))
    with pytest.raises(DataError, match="Alpha/character01/0003_01.png is 50x50, expected 105x105"):
        load_omniglot(fake, cache_dir=tmp_path / "cache")


def test_corrupt_png(fake: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(fake / "images_evaluation.zip", "w") as archive:
        for number, character in enumerate(FAKE_EVALUATION, start=1):
            for drawing in range(1, 21):
                png = b"\x89PNG garbage" if (number, drawing) == (2, 7) else drawing_png(drawing)
                archive.writestr(f"images_evaluation/{character}/{number:04d}_{drawing:02d}.png", png)
    with pytest.raises(DataError, match="Gamma/character01/0002_07.png is not a readable PNG"):
        load_omniglot(fake, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("corruption", ["truncated", "wrong_shape", "not_numpy", "empty", "zeroed_in_place",
                                        "index_edited"])
def test_corrupt_cache_is_rebuilt(
    fake: Path, tmp_path: Path, corruption: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = load_omniglot(fake, cache_dir=tmp_path / "cache")
    expected = np.array(first.images)
    del first  # drop the memmap before the file underneath changes
    (cached,) = (tmp_path / "cache" / "omniglot").glob("*.npy")
    if corruption == "truncated":
        cached.write_bytes(cached.read_bytes()[:-1000])
    elif corruption == "wrong_shape":
        np.save(cached, np.zeros((5, 20, 28, 27), dtype=np.uint8))
    elif corruption == "empty":
        cached.write_bytes(b"")
    elif corruption == "zeroed_in_place":  # same size, same header: only the pixels changed
        data = bytearray(cached.read_bytes())
        data[-5000:] = bytes(5000)
        cached.write_bytes(bytes(data))
    elif corruption == "index_edited":  # a background character moved to the evaluation part
        index_path = cached.with_suffix(".json")
        index = json.loads(index_path.read_text())
        index["background"][0] = not index["background"][0]
        index_path.write_text(json.dumps(index))
    else:
        cached.write_bytes(b"not numpy at all")
    with caplog.at_level(logging.INFO, logger="distmeta.data"):
        rebuilt = load_omniglot(fake, cache_dir=tmp_path / "cache")
    assert "is unusable" in caplog.text and "preprocessed 5 characters" in caplog.text
    assert np.array_equal(rebuilt.images, expected)


# --------------------------------------------------------------------------- source resolution and download


def test_source_argument_beats_env_and_env_beats_cache(fake: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(omniglot.CACHE_ENV, str(tmp_path / "env_cache"))
    monkeypatch.setenv(omniglot.SOURCE_ENV, str(tmp_path / "nowhere"))
    assert load_omniglot(fake).images.shape == (5, 20, 28, 28)
    assert list((tmp_path / "env_cache" / "omniglot").glob("*.npy"))
    with pytest.raises(DataError, match=f"\\${omniglot.SOURCE_ENV} .*nowhere does not exist"):
        load_omniglot()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="data.omniglot .*a_file is not a directory"):
        load_omniglot(tmp_path / "a_file")
    monkeypatch.setenv(omniglot.SOURCE_ENV, str(fake))
    monkeypatch.setattr(omniglot, "_download", lambda url, destination: pytest.fail("must not download"))
    assert load_omniglot().images.shape == (5, 20, 28, 28)


@pytest.fixture
def served(fake: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """The fake zips as the 'server' holds them, with OMNIGLOT_SOURCES pointing at their md5s."""
    content = {}
    for zip_name, (url, _) in list(OMNIGLOT_SOURCES.items()):
        content[url] = (fake / zip_name).read_bytes()
        monkeypatch.setitem(OMNIGLOT_SOURCES, zip_name, (url, hashlib.md5(content[url]).hexdigest()))
    monkeypatch.setattr(omniglot, "_download", lambda url, destination: destination.write_bytes(content[url]))
    return content


def test_download_with_matching_md5_is_accepted(served: dict[str, bytes], tmp_path: Path, monkeypatch) -> None:
    data = load_omniglot(cache_dir=tmp_path / "cache")
    raw = tmp_path / "cache" / "omniglot" / "raw"
    assert sorted(path.name for path in raw.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    monkeypatch.setattr(omniglot, "_download", lambda url, destination: pytest.fail("downloaded twice"))
    assert np.array_equal(load_omniglot(cache_dir=tmp_path / "cache").images, data.images)


def test_download_with_wrong_md5_is_rejected(served: dict[str, bytes], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(omniglot, "_download", lambda url, destination: destination.write_bytes(b"tampered"))
    with pytest.raises(DataError, match="images_background.zip downloaded with md5 .*expected .*DISTMETA_OMNIGLOT"):
        load_omniglot(cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "omniglot" / "raw").iterdir())  # nothing half-written is kept


def test_download_failure_and_disabled_download(fake: Path, tmp_path: Path, monkeypatch) -> None:
    def unreachable(url: str, destination: Path) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(omniglot, "_download", unreachable)
    with pytest.raises(DataError, match="could not download https://github.com/.*DISTMETA_OMNIGLOT"):
        load_omniglot(cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="missing and download=False"):
        load_omniglot(cache_dir=tmp_path / "cache", download=False)
