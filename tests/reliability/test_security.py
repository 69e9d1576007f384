"""Security promises (listed in SECURITY.md): a hostile data file, config or checkpoint cannot run code, reach files
outside its dataset, exhaust memory through one image, or hang an answer check.

Each promise has a static check over ``src/`` (AST, not regex: ``model.eval()`` is not ``eval(...)``) where that is
possible, and a behavioural test that feeds the hostile input and checks that its payload did not run.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from reliability_support import time_limit

import mpo
from mpo.data.errors import ImageError
from mpo.data.images import image_size, load_image

SRC = Path(mpo.__file__).parent

# ---------------------------------------------------------------------------------------------------------------
# Static: no code-executing loaders anywhere in src/

FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
SAFE_YAML = {"safe_load", "safe_load_all", "safe_dump", "safe_dump_all", "YAMLError", "SafeLoader", "SafeDumper"}


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_constructs(source: str, filename: str = "<src>") -> list[str]:
    """``file:line: what`` for every construct that could run code from data, a config or a checkpoint."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                found.append(f"{where}: {func.id}()")
            if isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else None
                if func.attr == "load" and owner == "torch" and not _is_const(_keyword(node, "weights_only"), True):
                    found.append(f"{where}: torch.load without weights_only=True")
                if func.attr == "load" and owner in ("np", "numpy") and _is_const(_keyword(node, "allow_pickle"), True):
                    found.append(f"{where}: numpy.load(allow_pickle=True)")
                if owner == "os" and func.attr in ("system", "popen"):
                    found.append(f"{where}: os.{func.attr}()")
                if func.attr == "read_pickle":
                    found.append(f"{where}: read_pickle()")
            if _is_const(_keyword(node, "trust_remote_code"), True):
                found.append(f"{where}: trust_remote_code=True hard-coded (it must come from an explicit flag)")
            if _is_const(_keyword(node, "safe_serialization"), False):
                found.append(f"{where}: safe_serialization=False")
            if _is_const(_keyword(node, "shell"), True):
                found.append(f"{where}: shell=True")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "yaml":
            if node.attr not in SAFE_YAML:
                found.append(f"{where}: yaml.{node.attr} (only the safe loader and dumper)")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{where}: import {name}")
    return sorted(found, key=lambda f: int(f.split(":")[1]))


def test_scanner_finds_each_forbidden_construct():
    """The scanner itself: each line below is one finding, and the safe spellings are not."""
    bad = "\n".join([
        "eval(s)", "exec(s)", "compile(s, 'f', 'exec')", "__import__(s)", "import pickle", "from dill import loads",
        "import marshal", "torch.load(p)", "torch.load(p, weights_only=False)", "np.load(p, allow_pickle=True)",
        "yaml.load(s)", "yaml.unsafe_load(s)", "yaml.full_load(s)", "yaml.load(s, Loader=yaml.Loader)",
        "AutoModel.from_pretrained(p, trust_remote_code=True)", "m.save_pretrained(p, safe_serialization=False)",
        "subprocess.run(c, shell=True)", "os.system(c)", "pd.read_pickle(p)",
    ])
    assert [f.split(": ", 1)[1] for f in unsafe_constructs(bad)] == [
        "eval()", "exec()", "compile()", "__import__()", "import pickle", "import dill", "import marshal",
        "torch.load without weights_only=True", "torch.load without weights_only=True",
        "numpy.load(allow_pickle=True)", "yaml.load (only the safe loader and dumper)",
        "yaml.unsafe_load (only the safe loader and dumper)", "yaml.full_load (only the safe loader and dumper)",
        "yaml.load (only the safe loader and dumper)", "yaml.Loader (only the safe loader and dumper)",
        "trust_remote_code=True hard-coded (it must come from an explicit flag)", "safe_serialization=False",
        "shell=True", "os.system()", "read_pickle()",
    ]
    safe = ("model.eval()\ntorch.load(p, weights_only=True)\nyaml.safe_load(s)\nnp.load(p)\n"
            "load_model(p, trust_remote_code=cfg.trust_remote_code)\nre.compile(r'x')")
    assert unsafe_constructs(safe) == []


def test_source_has_no_code_executing_loader():
    """No eval/exec/pickle on data or configs, torch.load only with weights_only=True, YAML only through the safe
    loader, weights only as safetensors, trust_remote_code never hard-coded on, no shell."""
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 40
    found = [f for path in files for f in unsafe_constructs(path.read_text(encoding="utf-8"), str(path.relative_to(SRC)))]
    assert found == []


# ---------------------------------------------------------------------------------------------------------------
# Behavioural: pickled payloads are refused


class Payload:
    """Unpickling this object would create ``marker``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.parametrize("poisoned", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_checkpoint_state_with_a_pickle_payload_is_refused(tmp_path, poisoned):
    from mpo.train.checkpoint import full_optimizer_state, load_training_state, rng_state

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    files = {"optimizer.pt": full_optimizer_state(model, optimizer), "scheduler.pt": scheduler.state_dict(), "rng.pt": rng_state()}
    marker = tmp_path / "payload-ran"
    files[poisoned] = {"state": Payload(marker)}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    (tmp_path / "trainer_state.json").write_text("{}")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_training_state(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert not marker.exists()


def test_model_weights_as_a_pickle_are_refused(tmp_path, tiny_internvl_dir):
    """A checkpoint that ships ``pytorch_model.bin`` (a pickle) instead of safetensors does not run its payload."""
    from mpo.models import load_model

    folder = tmp_path / "model"
    folder.mkdir()
    for file in tiny_internvl_dir.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, folder / file.name)
    marker = tmp_path / "payload-ran"
    torch.save({"lm_head.weight": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_model(folder)
    assert not marker.exists()


def test_index_cache_with_a_pickled_array_is_rebuilt_not_unpickled(tmp_path):
    """The annotation index cache is ``.npz``; a cache file holding an object array (a pickle) is ignored."""
    import numpy as np

    from mpo.data.index import AnnotationIndex, _cache_file

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"a": 1}\n{"a": 2}\n')
    cache = tmp_path / "cache"
    AnnotationIndex(rows, cache)  # writes the genuine cache
    marker = tmp_path / "payload-ran"
    payload = np.empty(1, dtype=object)
    payload[0] = Payload(marker)
    with open(_cache_file(rows.resolve(), cache), "wb") as fh:
        np.savez(fh, header=payload, starts=payload, ends=payload, lines=payload)
    index = AnnotationIndex(rows, cache)
    assert not index.from_cache and len(index) == 2 and index.raw(1) == b'{"a": 2}'
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# YAML: safe loader only


YAML_PAYLOAD = '!!python/object/apply:builtins.open ["{marker}", "w"]'


def test_yaml_config_with_a_python_tag_is_refused(tmp_path):
    from mpo.config import ConfigError, load_config
    from mpo.train.config import RunConfig

    marker = tmp_path / "payload-ran"
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  seed: " + YAML_PAYLOAD.format(marker=marker) + "\n")
    with pytest.raises(ConfigError, match="not valid YAML: could not determine a constructor for the tag "
                                          "'tag:yaml.org,2002:python/object/apply:builtins.open'"):
        load_config(RunConfig, config)
    assert not marker.exists()


def test_yaml_override_with_a_python_tag_does_not_run(tmp_path):
    """``key=value`` overrides are parsed with the safe loader too (the tag is refused, nothing runs)."""
    from mpo.config import ConfigError, load_config
    from mpo.train.config import RunConfig

    marker = tmp_path / "payload-ran"
    with pytest.raises(ConfigError):
        load_config(RunConfig, None, ["train.seed=" + YAML_PAYLOAD.format(marker=marker)])
    assert not marker.exists()


def test_yaml_override_with_a_python_tag_is_a_config_error(tmp_path):
    from mpo.config import ConfigError, load_config
    from mpo.train.config import RunConfig

    with pytest.raises(ConfigError, match="train.seed"):
        load_config(RunConfig, None, ["train.seed=" + YAML_PAYLOAD.format(marker=tmp_path / "x")])


# ---------------------------------------------------------------------------------------------------------------
# trust_remote_code: off unless explicitly asked for


def _remote_code_checkpoint(base: Path, source: Path, model_type: str, marker: Path) -> Path:
    folder = base / f"remote-{model_type}"
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel",
                          "AutoModel": "evil.EvilModel", "AutoProcessor": "evil.EvilProcessor"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return folder


@pytest.mark.parametrize("model_type", ["evil_vlm", "internvl"])
def test_checkpoint_code_runs_only_with_trust_remote_code(tmp_path, tiny_internvl_dir, model_type):
    """A checkpoint with its own Python code (config.json ``auto_map``): an unknown model type is refused with
    advice; a known one loads transformers' own class. Neither imports the shipped code."""
    from mpo.models import ModelLoadError, load_model, load_processor

    marker = tmp_path / "payload-ran"
    folder = _remote_code_checkpoint(tmp_path, tiny_internvl_dir, model_type, marker)
    if model_type == "evil_vlm":
        for load in (load_model, load_processor):
            with pytest.raises(ModelLoadError, match=r"defined by Python code shipped with the checkpoint "
                                                     r"\(config.json auto_map\); pass trust_remote_code=True"):
                load(folder)
    else:
        assert type(load_model(folder)).__module__.startswith("transformers.")
        assert type(load_processor(folder)).__module__.startswith("transformers.")
    assert not marker.exists()


def test_trust_remote_code_defaults_to_off_everywhere():
    """The config key and every command-line flag that can turn it on default to off."""
    import typer

    from mpo.cli import app
    from mpo.train.config import RunConfig

    assert RunConfig().model.trust_remote_code is False
    root = typer.main.get_command(app)
    flags = {}
    for name, command in root.commands.items():
        for sub_name, sub in getattr(command, "commands", {name: command}).items():
            for param in sub.params:
                if param.name == "trust_remote_code":
                    flags[f"{name} {sub_name}".strip()] = param.default
    assert {"eval eval", "generate correctness", "generate dropout-ntp", "models info"} <= set(flags)
    assert set(flags.values()) == {False}, flags


# ---------------------------------------------------------------------------------------------------------------
# Image paths: confined to the dataset root, symlinks included


@pytest.fixture
def dataset(tmp_path) -> Path:
    """``root/`` with a real image, a file and folder symlinked from outside, and a symlink that stays inside."""
    from PIL import Image

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(root / "sub" / "ok.png")
    Image.new("RGB", (4, 4), (9, 9, 9)).save(outside / "secret.png")
    os.symlink(outside / "secret.png", root / "file_link.png")
    os.symlink(outside, root / "dir_link")
    os.symlink(root / "sub" / "ok.png", root / "inner_link.png")
    return root


@pytest.mark.parametrize("rel, message", [
    ("../outside/secret.png", "resolves to {outside}/secret.png, outside the dataset root {root}"),
    ("sub/../../outside/secret.png", "resolves to {outside}/secret.png, outside the dataset root {root}"),
    ("file_link.png", "resolves to {outside}/secret.png, outside the dataset root {root}"),
    ("dir_link/secret.png", "resolves to {outside}/secret.png, outside the dataset root {root}"),
    ("{outside}/secret.png", "is an absolute path; paths must be relative to the dataset root"),
    ("file:///etc/passwd", "remote paths are not supported"),
    ("sub/ok.png\x00.txt", "contains a NUL character"),
])
def test_image_paths_outside_the_root_are_refused(dataset, rel, message):
    outside = dataset.parent / "outside"
    rel = rel.format(outside=outside)
    for read in (load_image, image_size):
        with pytest.raises(ImageError) as err:
            read(dataset, rel, dataset="ds", line=3)
        assert str(err.value).startswith(f"ds:3: image: {rel!r} ") or str(err.value).startswith("ds:3: image: remote")
        assert message.format(outside=outside, root=dataset) in str(err.value)


def test_image_paths_inside_the_root_load_and_the_flag_lifts_the_rule(dataset):
    assert load_image(dataset, "inner_link.png", dataset="ds", line=1).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(dataset, "sub/../sub/ok.png", dataset="ds", line=1).size == (4, 4)
    outside = load_image(dataset, "file_link.png", dataset="ds", line=1, allow_outside_root=True)
    assert outside.getpixel((0, 0)) == (9, 9, 9)


def test_rows_pointing_outside_the_root_are_row_errors_in_check(dataset, tmp_path):
    """Through ``mpo data check``: one image error per hostile row, naming dataset, line and field."""
    from mpo.data.check import run_check

    rows = ['{"image": "sub/ok.png", "question": "q", "chosen": "a", "rejected": "b"}',
            '{"image": "file_link.png", "question": "q", "chosen": "a", "rejected": "b"}',
            '{"image": ["sub/ok.png", "../outside/secret.png"], "question": "q", "chosen": "a", "rejected": "b"}']
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"hostile": {"root": str(dataset), "annotation": "rows.jsonl"}}))
    report = run_check(meta, progress=False, cache_dir=tmp_path / "cache")
    (found,) = report.datasets
    assert [(p.line, p.field, p.kind) for p in found.problems] == [(2, "image", "image"), (3, "image[1]", "image")]
    assert found.usable == 1 and report.exit_code == 1


def test_check_report_does_not_pass_terminal_escapes_through(dataset, tmp_path):
    """Names and paths from the data reach the terminal escaped: ``\\x1b`` is printed, never sent."""
    from mpo.data.check import run_check

    rows = ['{"image": "\\u001b]2;pwned\\u0007.png", "question": "q", "chosen": "a", "rejected": "b"}']
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"\x1b[31mred": {"root": str(dataset), "annotation": "rows.jsonl"}}))
    lines = run_check(meta, progress=False, cache_dir=tmp_path / "cache").lines()
    assert lines[0] == (f"\\x1b[31mred:1: image: file not found: {dataset}/\\x1b]2;pwned\\x07.png")
    assert not any("\x1b" in line or "\x07" in line for line in lines)


# ---------------------------------------------------------------------------------------------------------------
# Decompression bombs


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels in a few dozen bytes (no pixel data: a bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height, max_pixels, shown", [
    (20_000, 20_000, None, "400,000,000 pixels, over max_image_pixels 178,956,970"),  # PIL refuses it on open
    (15_000, 15_000, None, "225,000,000 pixels, over max_image_pixels 178,956,970"),
    (64, 64, 1_000, "64x64 = 4,096 pixels, over max_image_pixels 1,000"),  # our own limit, after the header
])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, width, height, max_pixels, shown):
    (tmp_path / "bomb.png").write_bytes(_png_header_only(width, height))
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    for read in (load_image, image_size):
        with time_limit(10), pytest.raises(ImageError) as err:
            read(tmp_path, "bomb.png", dataset="ds", line=4, **kwargs)
        assert str(err.value) == (f"ds:4: image: {tmp_path / 'bomb.png'} has {shown} (decompression-bomb guard; "
                                  "if the image is genuine, raise data.max_image_pixels for training, precompute and "
                                  "eval, or mpo data check --max-image-pixels; 0 = no limit)")


# ---------------------------------------------------------------------------------------------------------------
# Answer checkers: time-limited (math-verify's kill guard is tested in tests/generate/test_answers.py::
# test_hostile_string_times_out_and_guard_recovers); the pure-Python parts must stay fast on hostile text.


@pytest.mark.parametrize("pred, gt, mode", [
    ("9" * 100_000, "9" * 100_000 + "1", "auto"), ("a " * 200_000, "b " * 200_000, "anls"),
    ("\\boxed{" * 50_000, "x", "relaxed"), ("(" * 100_000 + "1", "1", "auto"), ("1e99999", "1", "relaxed"),
])
def test_answer_check_of_huge_hostile_text_is_fast(pred, gt, mode):
    from mpo.generate.answers import check_answer, extract_answer

    with time_limit(20):
        start = time.perf_counter()
        check_answer(pred, gt, mode, timeout=1.0)
        for version in ("en", "en_v2", "en_r1"):
            extract_answer(pred, version)
        assert time.perf_counter() - start < 10.0


def test_answer_marker_search_is_linear_on_a_long_run_of_spaces():
    from mpo.generate.answers import extract_answer

    response = "Some reasoning.\n\nFinal answer" + " " * 8_000 + "x"
    start = time.perf_counter()
    extract_answer(response, "en")
    assert time.perf_counter() - start < 0.25  # a linear scan of 8 kB takes well under a millisecond


@pytest.mark.parametrize("hostile", ['{"question": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "1"}',
                                     '{"question": "q", "answer": ' + "1" * 5000 + "}",
                                     '{"question": "\\ud800 q", "answer": "1"}'])
def test_generator_prompt_rows_fail_one_at_a_time(tmp_path, hostile):
    from mpo.generate.items import read_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question": "fine", "answer": "1"}\n' + hostile + "\n")
    read = read_prompts(prompts, required=("question", "answer"), prepare=lambda row, n: row["question"])
    assert len(read.items) == 1 and [e.line for e in read.rejected] == [2]


# ---------------------------------------------------------------------------------------------------------------
# Output paths: from the command line and fixed names only, never from row contents


class _PathLikeSampler:
    """Answers with text made of paths; implements the sampler protocol of ``mpo.generate.samplers``."""

    def sample(self, requests, n, params):
        from mpo.generate.samplers import Sample

        return [[Sample("../../../pwned/x.jsonl \\boxed{/tmp/pwned}", "stop", 3) for _ in req.seeds]
                for req in requests]


def test_generation_output_names_never_come_from_row_contents(tmp_path, monkeypatch):
    """Both generators, fed rows whose every field is a path (``item_id``, ``out_dir``, ``dataset``...), write
    exactly their fixed layout under ``--out-dir``; nothing anywhere else, nothing named after the data."""
    from PIL import Image

    from mpo.generate.correctness import CorrectnessConfig, run_correctness
    from mpo.generate.dropout_ntp import DropoutNTPConfig, run_dropout_ntp

    images, cwd, out = tmp_path / "images", tmp_path / "cwd", tmp_path / "out"
    images.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(images / "ok.png")
    hostile = {"item_id": "../../pwned", "out_dir": "/tmp/pwned", "dataset": "../pwned", "save_dir": "../pwned",
               "image": "ok.png"}
    rows = [{**hostile, "question": "../../../pwned/q?", "answer": "../pwned", "chosen": "../../pwned is the answer."},
            {**hostile, "image": "../../../../pwned.png", "question": "q", "answer": "a", "chosen": "c d"}]
    prompts = tmp_path / "prompts" / "hostile.jsonl"
    prompts.parent.mkdir()
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = {p for p in tmp_path.rglob("*")}

    common = dict(checkpoint="ckpt/run", prompt_path=str(prompts), out_dir=str(out), image_root=str(images),
                  num_return_sequences=2, num_workers=0, progress=False)
    run_correctness(CorrectnessConfig(**common), _PathLikeSampler(), env={})
    run_dropout_ntp(DropoutNTPConfig(**common), _PathLikeSampler(), env={})

    created = sorted(str(p.relative_to(tmp_path)) for p in set(tmp_path.rglob("*")) - before if p.is_file())
    layout = ["hostile.jsonl", "parts/hostile.jsonl.rank0-of-1.jsonl", "parts/hostile.jsonl.settings.json",
              "reports/hostile.rejected_prompts.jsonl", "reports/hostile.summary.json"]
    assert created == sorted([f"out/ckpt_run/max_tiles_6/{f}" for f in layout] + [f"out/ckpt_run/{f}" for f in layout])
    assert not list(cwd.iterdir()) and not Path("/tmp/pwned").exists()
    rejected = json.loads((out / "ckpt_run" / "reports" / "hostile.rejected_prompts.jsonl").read_text())
    assert rejected["line"] == 2 and "outside the dataset root" in rejected["message"]
