"""Tiny builders: the saved folder loads by path with the stock transformers classes, deterministically."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoProcessor, AutoTokenizer

from mpo.data.encode import PairEncoder
from mpo.data.records import PreferenceRecord
from mpo.models import build_tiny, default_corpus, load_model, load_processor, read_corpus

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey")


def test_internvl_folder_restores_stock_processor(tiny_internvl_dir):
    processor = AutoProcessor.from_pretrained(tiny_internvl_dir)
    ip = processor.image_processor
    assert type(processor).__name__ == "InternVLProcessor"
    assert type(ip).__name__ == "GotOcr2ImageProcessor"
    assert type(processor.video_processor).__name__ == "InternVLVideoProcessor"
    assert (ip.size.height, ip.size.width, ip.crop_to_patches, ip.min_patches, ip.max_patches) == (64, 64, True, 1, 12)
    assert list(ip.image_mean) == [0.485, 0.456, 0.406]  # ImageNet statistics, as the seed normalises
    config = json.loads((tiny_internvl_dir / "config.json").read_text())
    # (64 // 8)² = 64 patches, pixel shuffle 0.5 → 16 tokens per tile
    assert (config["image_seq_length"], config["downsample_ratio"], processor.image_seq_length) == (16, 0.5, 16)
    assert config["image_token_id"] == processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert processor.image_token_id == config["image_token_id"]


def test_qwen25vl_folder_restores_stock_processor(tiny_qwen25vl_dir):
    processor = AutoProcessor.from_pretrained(tiny_qwen25vl_dir)
    ip = processor.image_processor
    assert (type(processor).__name__, type(ip).__name__) == ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor")
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (8, 2, 2)
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (16 * 16, 64 * 64)
    config = json.loads((tiny_qwen25vl_dir / "config.json").read_text())
    # head_dim 128 / 4 = 32 → 16 rotary frequencies split over (t, h, w)
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [4, 6, 6]
    assert config["image_token_id"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")


@pytest.mark.parametrize("fixture", ["tiny_internvl_dir", "tiny_qwen25vl_dir", "tiny_qwen2_dir"])
def test_reloaded_tokenizer_equals_trained_one(fixture, request):
    """AutoTokenizer rebuilds a qwen2 config's pipeline itself (Qwen2Tokenizer); it must still match tokenizer.json."""
    path = request.getfixturevalue(fixture)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "Hello  world!\n\nThe cube is red. 12345 <|im_end|>\n  Café x"
    for tok in (AutoTokenizer.from_pretrained(path), getattr(load_processor(path), "tokenizer", None)):
        if tok is not None:
            assert tok(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids
            assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_colour_words_are_single_tokens(tiny_internvl_dir):
    tok = load_processor(tiny_internvl_dir).tokenizer
    assert all(len(tok(f" {c}", add_special_tokens=False)["input_ids"]) == 1 for c in COLOURS)


@pytest.mark.parametrize(("chosen", "rejected"), [("The cube is red.", "The cube is blue."),
                                                  ("A green ball is in the image.", "A purple ball is in the image."),
                                                  ("I see a white star on the left.", "I see a brown star on the left.")])
def test_colour_answers_differ_in_exactly_one_token(tiny_internvl_dir, chosen, rejected):
    enc = PairEncoder(load_processor(tiny_internvl_dir))
    record = PreferenceRecord("demo", 1, "<image>\nWhat colour is it?", chosen, rejected, ("a.png",))
    pair = enc.encode(record, [Image.new("RGB", (64, 64))])
    assert len(pair.chosen_ids) == len(pair.rejected_ids)
    assert int((pair.chosen_ids != pair.rejected_ids).sum()) == 1


def test_user_corpus_word_becomes_one_token(tmp_path):
    out = build_tiny(tmp_path / "m", "qwen2", corpus=["The zorblax glows."] * 40)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.tokenize(" zorblax") == ["Ġzorblax"]


def test_build_is_deterministic_for_a_seed(tmp_path):
    a, b, c = (build_tiny(tmp_path / name, "internvl", seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.parametrize("fixture", ["tiny_internvl_dir", "tiny_qwen25vl_dir"])
def test_forward_on_an_encoded_pair(fixture, request):
    """A random-init model predicts ~uniformly: the loss on prompt+chosen is close to ln(vocab)."""
    path = request.getfixturevalue(fixture)
    model, processor = load_model(path), load_processor(path)
    record = PreferenceRecord("d", 1, "<image>\nWhat colour is the cube?", "The cube is red.", "The cube is blue.",
                              ("a.png",))
    pair = PairEncoder(processor).encode(record, [Image.new("RGB", (192, 64), (200, 30, 30))], max_patches=6)
    ids = torch.cat([pair.prompt_ids, pair.chosen_ids])[None]
    inputs = {k: v for k, v in pair.image_inputs.items() if k != "mm_token_type_ids"}
    if "mm_token_type_ids" in pair.image_inputs:  # text (0) over the completion
        inputs["mm_token_type_ids"] = torch.nn.functional.pad(pair.image_inputs["mm_token_type_ids"],
                                                              (0, len(pair.chosen_ids)))[None]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, **inputs)
    vocab = model.config.text_config.vocab_size
    assert tuple(out.logits.shape) == (1, ids.shape[1], vocab)
    assert abs(out.loss.item() - math.log(vocab)) < 0.4


def test_generation_stops_at_end_of_turn(tiny_internvl_dir):
    model = load_model(tiny_internvl_dir)
    im_end = load_processor(tiny_internvl_dir).tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == im_end


def test_default_corpus_repeats_every_colour():
    """5 sentence templates x 10 shapes name each colour after a space: 50 times, enough for one BPE merge."""
    text = " ".join(default_corpus())
    assert {c: text.count(f" {c} ") + text.count(f" {c}.") for c in COLOURS} == dict.fromkeys(COLOURS, 50)


def test_read_corpus_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  \nsecond line\n")
    (tmp_path / "b.jsonl").write_text('{"q": "what", "n": 3, "c": [{"t": "deep"}]}\n\n{"a": "x"}\n')
    assert read_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == ["first line", "second line", "what", "deep", "x"]
    (tmp_path / "bad.jsonl").write_text('{"q": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"^.*bad\.jsonl:2: invalid JSON: Expecting property name enclosed in "
                                         r"double quotes$"):
        read_corpus([tmp_path / "bad.jsonl"])


def test_build_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^arch must be one of internvl, qwen2_5_vl, qwen2, got 'llava'$"):
        build_tiny(tmp_path / "m", "llava")
    with pytest.raises(ValueError, match=r"^image_size / patch_size must be an even integer \(pixel shuffle 0\.5\), "
                                         r"got 48/16$"):
        build_tiny(tmp_path / "m", "internvl", patch_size=16, image_size=48)  # 3x3 patches: odd
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"notes: exists and is not a model folder \(no mpo_tiny\.json\); "
                                              r"refusing to replace it: delete it yourself or choose another folder$"):
        build_tiny(tmp_path / "notes", "qwen2")
    assert (tmp_path / "notes" / "x.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no temporary folder left behind


def test_only_a_tiny_model_is_replaced(tmp_path):
    """A real checkpoint or a trained run (config.json, weights) is never replaced; an earlier tiny model is."""
    first = build_tiny(tmp_path / "m", "qwen2", vocab_size=400)
    assert json.loads((first / "mpo_tiny.json").read_text())["arch"] == "qwen2"
    build_tiny(tmp_path / "m", "qwen2", vocab_size=400, seed=1)
    assert json.loads((first / "mpo_tiny.json").read_text())["seed"] == 1
    (first / "mpo_tiny.json").unlink()  # now it looks like any downloaded checkpoint or a run's final/
    weights = (first / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"m: holds a model without the mark of `mpo models tiny` \(a "
                                              r"checkpoint, a run's final/, or a tiny model built before mpo marked "
                                              r"them\) \(no mpo_tiny\.json\); refusing to replace it"):
        build_tiny(tmp_path / "m", "qwen2", vocab_size=400)
    assert (first / "model.safetensors").read_bytes() == weights


def test_a_link_to_a_tiny_model_is_rebuilt_in_place(tmp_path):
    """The link keeps pointing at the rebuilt model; no ``.link.old`` is left behind to break the next build."""
    first = build_tiny(tmp_path / "m", "qwen2", vocab_size=400)
    (tmp_path / "link").symlink_to(first)
    for seed in (1, 2):
        assert build_tiny(tmp_path / "link", "qwen2", vocab_size=400, seed=seed) == tmp_path / "link"
    assert (tmp_path / "link").is_symlink() and json.loads((first / "mpo_tiny.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "m"]
