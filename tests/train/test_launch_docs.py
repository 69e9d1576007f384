"""docs/launch.md and docs/scale.md: every command, flag, config key and path they name exists, and every table
of numbers is exactly what ``benchmarks/capacity_plan.py`` prints (no hand-made numbers).

Also checks the capacity plan's parameter counts against transformers' own InternVL built on the meta device,
and against the sizes InternVL publishes.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "docs" / "launch.md", ROOT / "docs" / "scale.md"]
PLAN_PATH = ROOT / "benchmarks" / "capacity_plan.py"


def _load_plan():
    spec = importlib.util.spec_from_file_location("capacity_plan", PLAN_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["capacity_plan"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


plan = _load_plan()


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _blocks(path: Path) -> list[tuple[str, str]]:
    return [(m.group("name"), m.group("body")) for m in plan.BLOCK.finditer(_text(path))]


# ----------------------------------------------------------------------------------------------------------------
# The numbers come from the script


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_tables_are_the_scripts_output(doc):
    blocks = _blocks(doc)
    assert blocks, f"{doc.name} has no generated blocks"
    text = _text(doc)
    for name, body in blocks:
        if name == "demo-check":
            assert "capacity_plan.py --demo-check" in text
            continue
        assert name in plan.SECTIONS, f"{doc.name}: unknown capacity_plan section {name!r}"
        assert f"capacity_plan.py --section {name}" in text, f"{doc.name}: the command for section {name} is not quoted"
        assert body == plan.render(name), (f"{doc.name}: block {name!r} differs from the script's output; run "
                                           "python benchmarks/capacity_plan.py --write-docs")


def test_every_number_table_in_the_docs_is_generated():
    """A markdown table with a digit in it must sit inside a generated block."""
    for doc in DOCS:
        stripped = plan.BLOCK.sub("", _text(doc))
        for line in stripped.splitlines():
            if line.startswith("|") and re.search(r"\d", line):
                pytest.fail(f"{doc.name}: hand-written table row with numbers: {line}")


# Numbers in the prose that look computed: ranges (162–185), ratios (2.57×), sizes (71.5 GiB, 17.1 GB, 256 MiB),
# hours, billions with decimals (3.35B). Inputs (the seed's settings, config values, %) are not matched.
NUM = r"\d(?:[\d,]*\d)?"
COMPUTED = re.compile(rf"(?<![§\w.])({NUM}(?:\.\d+)?–{NUM}(?:\.\d+)?)(?![\d%]| %)"
                      rf"|(?<![\w.])({NUM}\.\d+)(?=×|B\b| GiB| GB)"
                      rf"|(?<![\w.])({NUM})(?= MiB| GPU-hours| hours|-token mean)")


def test_numbers_in_the_prose_come_from_the_script():
    output = "\n".join(plan.render(name) for name in plan.SECTIONS)
    checked = 0
    for doc in DOCS:
        prose = re.sub(r"```.*?```", "", plan.BLOCK.sub("", _text(doc)), flags=re.S)
        for m in COMPUTED.finditer(prose):
            figure = next(g for g in m.groups() if g)
            assert figure in output, f"{doc.name}: {figure!r} in the text is not printed by capacity_plan.py"
            checked += 1
    assert checked >= 10


def test_write_docs_is_idempotent():
    assert plan.write_docs() == []


@pytest.mark.slow
def test_demo_check_block_is_measured():
    """The demo lengths quoted in scale.md are what `--demo-check` measures now (runs mpo, ~20 s)."""
    body = dict(_blocks(ROOT / "docs" / "scale.md"))["demo-check"]
    assert body == plan.demo_check()


def test_script_runs_every_section(capsys):
    assert plan.main([]) == 0
    out = capsys.readouterr().out
    for name in plan.SECTIONS:
        assert f"## {name}" in out


# ----------------------------------------------------------------------------------------------------------------
# The plan's arithmetic


def _hf_config(m):
    from transformers import InternVLConfig

    v, llm = m.vit, m.llm
    vision = dict(hidden_size=v.hidden, intermediate_size=v.intermediate, num_hidden_layers=v.layers,
                  num_attention_heads=v.heads, attention_bias=v.qkv_bias, use_qk_norm=v.qk_norm,
                  norm_type="rms_norm" if v.rms_norm else "layer_norm", image_size=[448, 448], patch_size=[14, 14],
                  use_mean_pooling=True, use_mask_token=False)
    text = dict(model_type="qwen3_moe" if llm.experts else "qwen3", hidden_size=llm.hidden,
                num_hidden_layers=llm.layers, num_attention_heads=llm.heads, num_key_value_heads=llm.kv_heads,
                head_dim=llm.head_dim, vocab_size=llm.vocab, tie_word_embeddings=llm.tied,
                intermediate_size=llm.intermediate or 1)
    if llm.experts:
        text.update(num_experts=llm.experts, num_experts_per_tok=llm.active_experts,
                    moe_intermediate_size=llm.expert_intermediate, decoder_sparse_step=1, mlp_only_layers=[])
    return InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5, tie_word_embeddings=llm.tied)


@pytest.mark.parametrize("key", [m.key for m in plan.MODELS])
def test_parameter_counts_match_transformers(key):
    """The closed-form counts equal transformers' InternVLForConditionalGeneration of the same shape (meta device)."""
    import torch
    from transformers import InternVLForConditionalGeneration

    m = plan.model(key)
    with torch.device("meta"):
        net = InternVLForConditionalGeneration(_hf_config(m))
    inner = net.model
    assert sum(p.numel() for p in net.parameters()) == m.total()
    assert sum(p.numel() for p in inner.vision_tower.parameters()) == m.vit.params()
    assert sum(p.numel() for p in inner.multi_modal_projector.parameters()) == m.projector()
    assert sum(p.numel() for p in inner.language_model.parameters()) + net.lm_head.weight.numel() == m.llm.params()


@pytest.mark.parametrize("key", [m.key for m in plan.MODELS])
def test_parameter_counts_round_to_the_published_sizes(key):
    m = plan.model(key)
    vision, language, total = m.published
    assert f"{m.vit.params() / 1e9:.1f}B" == vision
    assert f"{m.llm.params() / 1e9:.1f}B" == language
    assert total.startswith(f"{m.total() / 1e9:.1f}B")
    if m.llm.experts:  # "-A3B" counts the language model's active parameters (3.3B), "-A28B" the whole model's
        active = int(total.rsplit("-A", 1)[1].rstrip("B"))
        assert active in (round(m.active() / 1e9), round(m.llm.params(active=True) / 1e9))


def test_tokens_per_tile_and_shared_layout_counts():
    assert plan.TOKENS_PER_TILE == 256
    cap = plan.MAIN
    assert cap.image_tokens == 13 * 256 + 2
    assert cap.shared_tokens == cap.prompt + cap.chosen + cap.rejected
    assert cap.naive_tokens == 2 * cap.prompt + cap.chosen + cap.rejected
    # the shared layout's attention pairs: fewer than two causal sequences, more than one causal segment's half
    s = plan.shared_pairs(cap)
    assert s < plan.causal_pairs(cap.prompt + cap.chosen) + plan.causal_pairs(cap.prompt + cap.rejected)
    assert s > plan.causal_pairs(cap.prompt)


def test_fast_path_saves_and_cache_moves_the_reference_cost():
    m, s = plan.model("8b"), plan.MAIN
    naive = plan.train_total(plan.pair_flops(m, s, "naive"))
    ref = plan.pair_flops(m, s, "shared_ref")
    cache = plan.pair_flops(m, s, "shared_cache")
    assert naive > plan.train_total(ref) > plan.train_total(cache)
    # with the vision tower training, the cache plus its precompute costs exactly the in-loop reference
    assert plan.train_total(cache) + cache["precompute"] == pytest.approx(plan.train_total(ref))


# ----------------------------------------------------------------------------------------------------------------
# Commands, flags, config keys and paths named in the docs exist


def _code(text: str) -> list[str]:
    """Fenced blocks (with shell line continuations joined) and inline code spans."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    rest = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    return [b.replace("\\\n", " ") for b in fenced] + re.findall(r"`([^`\n]+)`", rest)


def _commands(text: str) -> list[list[str]]:
    """Token lists that start at ``mpo`` (the console script or ``-m mpo.cli``), recursing into ``bash -c '...'``."""
    found = []

    def scan(line: str) -> None:
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            return
        for i, tok in enumerate(tokens):
            if " " in tok and "mpo" in tok:
                for sub in tok.splitlines():
                    scan(sub)
                continue
            if tok == "mpo" or (tok == "mpo.cli" and i > 0 and tokens[i - 1] == "-m"):
                cmd = []
                for t in tokens[i + 1:]:
                    if t in ("&", "&&", "|", "||", ";", "done", "wait"):
                        break
                    cmd.append(t)
                found.append(cmd)

    for block in _code(text):
        for line in block.splitlines():
            scan(line)
    return found


def _resolve(words: list[str]):
    import typer

    from mpo.cli import app

    cmd = typer.main.get_command(app)
    path, rest = [], list(words)
    while rest and hasattr(cmd, "commands") and not rest[0].startswith("-"):  # a group (typer's own click)
        name = rest.pop(0)
        sub = cmd.commands.get(name)
        assert sub is not None, f"mpo {' '.join(path + [name])}: no such command"
        cmd, path = sub, path + [name]
    return cmd, path, rest


def test_every_mpo_command_flag_and_override_exists():
    from mpo.config import load_config
    from mpo.train.config import RunConfig

    n = 0
    for doc in DOCS:
        for words in _commands(_text(doc)):
            cmd, path, rest = _resolve(words)
            options = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
            for tok in rest:
                if tok.startswith("--"):
                    flag = tok.split("=", 1)[0]
                    assert flag in options, f"{doc.name}: mpo {' '.join(path)} has no option {flag}"
                elif re.match(r"^(model|data|loss|train)\.[\w.]+=", tok):
                    load_config(RunConfig, None, [tok])  # raises ConfigError naming a wrong key or value
            n += 1
    assert n >= 15  # the docs are command-heavy; a parsing slip would find none


def test_accelerate_launch_flags_exist():
    from accelerate.commands.launch import launch_command_parser

    known = {o for a in launch_command_parser()._actions for o in a.option_strings}
    for doc in DOCS:
        for block in _code(_text(doc)):
            for m in re.finditer(r"accelerate launch (.*?)(?:-m mpo\.cli|$)", block.replace("\n", " ")):
                for flag in re.findall(r"(--[\w-]+)", m.group(1)):
                    assert flag in known, f"{doc.name}: accelerate launch has no {flag}"


def test_named_repository_paths_exist():
    pattern = re.compile(r"\b((?:configs|benchmarks|docs|src|tests)/[\w./-]*\w)")
    for doc in DOCS:
        for path in set(pattern.findall(_text(doc))):
            assert (ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"
    for doc in DOCS:  # relative links between docs
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", _text(doc)):
            assert (doc.parent / link).exists(), f"{doc.name} links to {link}, which does not exist"


def _slugs(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", _text(path), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_anchors_between_the_docs_exist():
    for doc in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#:]*)#([^)]+)\)", _text(doc)):
            path = (doc.parent / target) if target else doc
            assert anchor in _slugs(path), f"{doc.name} links to {target}#{anchor}, which has no such heading"


def test_fsdp2_config_is_an_accelerate_fsdp2_file():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / "fsdp2.yaml"))
    assert str(cfg.distributed_type).endswith("FSDP")
    assert cfg.mixed_precision == "bf16"
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False  # mpo copies the loaded model for the reference
    assert fsdp["fsdp_activation_checkpointing"] is False  # mpo enables gradient checkpointing itself
    assert set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) == {"Qwen3DecoderLayer", "InternVLVisionLayer"}
