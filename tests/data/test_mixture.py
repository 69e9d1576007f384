"""PreferenceMixture: repeat_time counts and seeding, item lookup across datasets, images, tile budgets."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from mpo.data import ImageError, PreferenceMixture, RowError, read_meta, select_rows


def _rows(n: int, prefix: str = "q") -> list[dict]:
    return [{"question": f"{prefix}{k}", "chosen": "a", "rejected": "b"} for k in range(n)]


def _rows_of(mix: PreferenceMixture) -> list[tuple[int, int]]:
    return [mix.locate(i) for i in range(len(mix))]


@pytest.mark.parametrize("repeat, expected", [(0.5, 5), (0.25, 2), (0.05, 0), (1, 10), (2.3, 23), (2.9, 29),
                                              (1.5, 15), (3, 30), (0, 0)])
def test_repeat_time_counts(repeat, expected):
    """int(N * r) on the decimal r: 10 x 0.25 = 2.5 -> 2; 10 x 0.05 = 0.5 -> 0; 10 x 2.3 = 23, where float
    arithmetic on the fraction gives 10 x (2.3 - 2) = 2.9999999999999982 -> 22."""
    assert len(select_rows(10, repeat, seed=0, name="ds")) == expected


def test_fraction_above_one_adds_a_distinct_subsample():
    sel = select_rows(10, 2.3, seed=0, name="ds")
    counts = Counter(sel.row(j) for j in range(len(sel)))
    assert sorted(counts) == list(range(10))
    assert sorted(counts.values()) == [2] * 7 + [3] * 3


def test_subsample_is_distinct_and_seeded():
    picks = {seed: [select_rows(100, 0.3, seed=seed, name="ds").row(j) for j in range(30)] for seed in (1, 1, 2)}
    assert len(set(picks[1])) == 30
    assert [select_rows(100, 0.3, seed=1, name="ds").row(j) for j in range(30)] == picks[1]
    assert picks[2] != picks[1]
    assert [select_rows(100, 0.3, seed=1, name="other").row(j) for j in range(30)] != picks[1]


def test_negative_repeat_is_refused():
    with pytest.raises(ValueError, match="ds: repeat_time must be a finite number >= 0, got -1"):
        select_rows(10, -1, seed=0, name="ds")


def test_mixture_concatenates_in_meta_order(write_dataset):
    write_dataset(_rows(4, "a"), name="a")
    write_dataset(_rows(10, "b"), name="b", repeat_time=0.5)
    meta = write_dataset([], name="off", repeat_time=0)
    mix = PreferenceMixture(read_meta(meta), seed=3)
    assert mix.dataset_sizes == {"a": 4, "b": 5, "off": 0} and len(mix) == 9
    assert _rows_of(mix)[:4] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert all(d == 1 for d, _ in _rows_of(mix)[4:])
    assert [mix.record(i).question for i in range(4)] == ["a0", "a1", "a2", "a3"]
    assert mix.record(4).dataset == "b" and mix.record(4).line == mix.locate(4)[1] + 1
    with pytest.raises(IndexError, match=r"mixture index 9 out of range \[0, 9\)"):
        mix.locate(9)


def test_same_seed_same_mixture_across_constructions(write_dataset):
    meta = write_dataset(_rows(50), repeat_time=1.4)
    specs = read_meta(meta)
    first = _rows_of(PreferenceMixture(specs, seed=7))
    assert first == _rows_of(PreferenceMixture(specs, seed=7))
    assert first != _rows_of(PreferenceMixture(specs, seed=8))


def test_adding_a_dataset_does_not_change_another_subsample(write_dataset):
    meta = write_dataset(_rows(50), name="b", repeat_time=0.5)
    alone = [r for _, r in _rows_of(PreferenceMixture(read_meta(meta), seed=1))]
    write_dataset(_rows(3), name="a")
    specs = read_meta(meta)
    mixed = PreferenceMixture([specs[1], specs[0]], seed=1)
    assert [r for d, r in _rows_of(mixed) if d == 1] == alone


def test_bad_row_raises_row_error_naming_line(write_dataset):
    meta = write_dataset([_rows(1)[0], b"", {"question": "q"}])
    mix = PreferenceMixture(read_meta(meta))
    assert len(mix) == 2  # the blank line is not a row
    with pytest.raises(RowError) as err:
        mix.record(1)
    assert str(err.value) == "ds:3: chosen: is missing"


def test_images_and_tile_budget(write_dataset, write_png, tmp_path):
    write_png(tmp_path / "images" / "a.png", size=(6, 4))
    write_dataset([{"image": ["a.png", "a.png", "missing.png"], "question": "q", "chosen": "a", "rejected": "b"}],
                  name="multi", max_dynamic_patch=7)
    meta = write_dataset([{"image": "a.png", "question": "q", "chosen": "a", "rejected": "b"}], name="single")
    mix = PreferenceMixture(read_meta(meta), max_dynamic_patch=5)
    multi, single = mix.record(0), mix.record(1)
    assert (mix.tile_budget(multi), mix.tile_budget(single)) == (2, 5)  # 7 // 3; the global 5 for one image
    assert [img.size for img in mix.images(single)] == [(6, 4)]
    with pytest.raises(ImageError) as err:
        mix.images(multi)
    assert (err.value.field, err.value.line) == ("image[2]", 1)


def test_max_image_pixels_is_the_bomb_limit_of_the_mixture(write_dataset, write_png, tmp_path):
    """``data.max_image_pixels`` reaches load_image: 24 pixels over a limit of 23 is a row error; 0 and None lift it."""
    write_png(tmp_path / "images" / "a.png", size=(6, 4))
    specs = read_meta(write_dataset([{"image": "a.png", "question": "q", "chosen": "a", "rejected": "b"}]))
    strict = PreferenceMixture(specs, max_image_pixels=23)
    with pytest.raises(ImageError, match="6x4 = 24 pixels, over max_image_pixels 23 .*raise data.max_image_pixels"):
        strict.images(strict.record(0))
    for limit in (24, 0, None):
        mix = PreferenceMixture(specs, max_image_pixels=limit)
        assert [img.size for img in mix.images(mix.record(0))] == [(6, 4)]
    assert PreferenceMixture(specs).max_image_pixels == 178_956_970  # PIL's limit by default
    with pytest.raises(ValueError, match="max_image_pixels must be an integer >= 0"):
        PreferenceMixture(specs, max_image_pixels=-1)


def test_length_mismatch_is_logged(write_dataset, caplog):
    meta = write_dataset(_rows(3), length=5)
    with caplog.at_level(logging.WARNING, logger="mpo.data.mixture"):
        PreferenceMixture(read_meta(meta))
    assert "ds: meta length 5 differs from the 3 rows of" in caplog.text


def test_a_fraction_that_selects_no_row_is_logged(write_dataset, caplog):
    meta = write_dataset(_rows(5), repeat_time=0.1)
    with caplog.at_level(logging.WARNING, logger="mpo.data.mixture"):
        assert PreferenceMixture(read_meta(meta)).dataset_sizes == {"ds": 0}
    assert "ds: repeat_time 0.1 of 5 rows selects none (int(5 x 0.1) = 0): the dataset is left out" in caplog.text


def test_duplicate_names_are_refused(write_dataset):
    (spec,) = read_meta(write_dataset(_rows(1)))
    with pytest.raises(ValueError, match="dataset names must be unique, repeated: ds"):
        PreferenceMixture([spec, spec])
