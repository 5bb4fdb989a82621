"""Loading: the tiny checkpoint, strict Q-Former names, LAVIS overlays, quantization, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from models import MALMM, CheckpointError, ModelNotAvailableError
from models.overlay import lavis_to_hf_key
from models.qformer import MemoryQFormer


def _load(path, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    return MALMM.from_pretrained(str(path), device="cpu", **kwargs)


def test_tiny_checkpoint_is_deterministic_and_small(tiny_dir, tmp_path):
    from models.tiny import write_tiny_checkpoint

    again = write_tiny_checkpoint(tmp_path / "again")
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("tokenizer.json", "qformer_tokenizer/tokenizer.json", "config.json"):
        assert (tiny_dir / name).read_text() == (again / name).read_text()
    size = sum(f.stat().st_size for f in tiny_dir.rglob("*") if f.is_file())
    assert size < 5_000_000


def test_tiny_random_preset_name_loads_through_the_same_path(monkeypatch, tmp_path):
    monkeypatch.setenv("MALMM_CACHE_DIR", str(tmp_path))
    model = MALMM.from_pretrained("tiny-random", dtype=torch.float32, device="cpu")
    from models.tiny import TINY_VERSION

    assert (tmp_path / "models" / f"tiny-random-v{TINY_VERSION}" / "config.json").exists()
    assert model.num_query_tokens == 32 and model.memory_bank_length == 20


def test_a_second_first_build_of_tiny_random_waits_and_reuses(tmp_path):
    """Two processes on a fresh cache at once (a batch, the test suite): the second waits for
    the first and then uses its checkpoint. Without that, one process's rename or rmtree broke
    the other's ("Directory not empty", FileNotFoundError, a half-written model)."""
    from filelock import FileLock

    from models.tiny import write_tiny_checkpoint

    target = tmp_path / "tiny"
    code = ("import sys; from pathlib import Path; from models.tiny import ensure_tiny_checkpoint; "
            "ensure_tiny_checkpoint(Path(sys.argv[1])); print('ready')")
    with FileLock(str(tmp_path / ".tiny.lock")):  # this process is the first builder
        proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(8)
        assert proc.poll() is None and not target.exists()  # waiting, writing nothing
        write_tiny_checkpoint(target)
        built = (target / "model.safetensors").stat().st_mtime_ns
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "ready", err[-500:]
    assert (target / "model.safetensors").stat().st_mtime_ns == built  # reused, not rewritten
    assert sorted(x.name for x in tmp_path.iterdir()) == [".tiny.lock", "tiny"]  # no temp dirs left


def test_tiny_tokenizers_have_the_hub_special_token_layout(tiny_model):
    """As transformers' conversion script builds Salesforce/instructblip-vicuna-7b's tokenizers:
    LLaMA's <unk>, <s>, </s> at 0-2 with </s> as BOS, EOS and UNK and [PAD] appended; the
    Q-Former's uncased BERT with [DEC] appended as BOS, truncating from the left."""
    tok, qtok = tiny_model.tokenizer, tiny_model.qformer_tokenizer
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tok.bos_token == tok.eos_token == tok.unk_token == "</s>"
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == max(tok.get_vocab().values()) - 1  # then <image>
    assert tok.truncation_side == "left"
    assert qtok.bos_token == "[DEC]" and qtok.bos_token_id == len(qtok) - 1
    assert qtok.truncation_side == "left" and qtok("WHAT Video").input_ids == qtok("what video").input_ids


def test_a_tokenizer_whose_bos_is_not_eos_is_refused(tiny_dir, tmp_path):
    broken = tmp_path / "llama_bos"
    shutil.copytree(tiny_dir, broken)
    config_path = broken / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["bos_token"] = "<s>"  # LLaMA's own BOS: InstructBLIP-Vicuna was trained with "</s>"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="BOS token is '<s>'"):
        _load(broken)


def test_qformer_parameter_names_are_instructblips(hf_model):
    ours = MemoryQFormer(hf_model.config.qformer_config, num_query_tokens=32)
    ours.load_state_dict(hf_model.qformer.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(hf_model.qformer.state_dict())


def test_qformer_precision_follows_the_model_and_loads_from_full_precision(tiny_dir):
    """bf16 model: bf16 Q-Former by default (loaded from the fp32 checkpoint, rounded once);
    qformer_dtype=float32 keeps the checkpoint's exact values; an fp32 model stays fp32."""
    exact = load_file(tiny_dir / "model.safetensors")
    model = _load(tiny_dir, dtype=torch.bfloat16)
    assert model.vision_dtype == torch.bfloat16
    assert model.language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.qformer_dtype == model.query_tokens.dtype == model.language_projection.weight.dtype == torch.bfloat16
    name = "qformer.encoder.layer.1.output_query.dense.weight"
    assert torch.equal(model.qformer.encoder.layer[1].output_query.dense.weight, exact[name].bfloat16())
    full = _load(tiny_dir, dtype=torch.bfloat16, qformer_dtype=torch.float32)
    assert full.qformer_dtype == full.temporal_embedding.weight.dtype == torch.float32
    assert torch.equal(full.qformer.encoder.layer[1].output_query.dense.weight, exact[name])
    assert torch.equal(full.query_tokens.detach(), exact["query_tokens"])
    assert _load(tiny_dir, dtype=torch.float32).qformer_dtype == torch.float32


def test_a_bf16_model_runs_end_to_end(tiny_dir, pixels):
    model = _load(tiny_dir, dtype=torch.bfloat16)
    stream = model.new_stream(["what does the video describe?", "who wins?"], memory_bank_length=2)
    stream.add_frames(pixels[:5])
    assert stream.query_output().dtype == torch.bfloat16 and stream.memory.compressions == 3
    assert len(model.generate(stream, max_new_tokens=4, num_beams=2)) == 2
    assert model.score(stream, None, ["a", "b c"]).shape == (2, 2)


# ---- LAVIS overlays ---------------------------------------------------------------------


def _to_lavis(name: str) -> str:
    """Inverse of method.md's key mapping, written independently for the test."""
    if name.startswith("qformer."):
        name = name.replace("qformer.", "Qformer.bert.", 1).replace("embeddings.layernorm.", "embeddings.LayerNorm.")
        return name.replace(".crossattention.attention.", ".crossattention.self.").replace(
            ".attention.attention.", ".attention.self.")
    return {
        "language_projection.weight": "llm_proj.weight",
        "temporal_embedding.weight": "image_pe.weight",
        "vision_model.post_layernorm.weight": "ln_vision.weight",
        "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
        "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
        "vision_model.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
        "vision_model.encoder.layers.1.self_attn.qkv.weight": "visual_encoder.blocks.1.attn.qkv.weight",
        "vision_model.encoder.layers.1.layer_norm1.weight": "visual_encoder.blocks.1.norm1.weight",
        "vision_model.encoder.layers.1.mlp.fc1.bias": "visual_encoder.blocks.1.mlp.fc1.bias",
        "vision_model.encoder.layers.0.self_attn.projection.weight": "visual_encoder.blocks.0.attn.proj.weight",
    }.get(name, name)


OVERLAID = [
    "qformer.encoder.layer.0.attention.attention.query.weight",
    "qformer.encoder.layer.2.crossattention.attention.key.bias",
    "qformer.encoder.layer.1.output_query.LayerNorm.weight",
    "qformer.embeddings.layernorm.weight",
    "query_tokens",
    "language_projection.weight",
    "temporal_embedding.weight",
    "vision_model.post_layernorm.weight",
    "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.position_embedding",
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.encoder.layers.1.self_attn.qkv.weight",
    "vision_model.encoder.layers.1.layer_norm1.weight",
    "vision_model.encoder.layers.1.mlp.fc1.bias",
    "vision_model.encoder.layers.0.self_attn.projection.weight",
]


@pytest.fixture(scope="module")
def lavis_checkpoint(tiny_dir, tmp_path_factory):
    """A LAVIS-format MA-LMM checkpoint: new values for OVERLAID (plus q/v biases of block 1)."""
    model = _load(tiny_dir)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(42)
    state, expected = {}, {}
    for name in OVERLAID:
        value = torch.randn(params[name].shape, generator=gen)
        state[_to_lavis(name)] = value
        expected[name] = value
    q, v = torch.randn(32, generator=gen), torch.randn(32, generator=gen)
    state["visual_encoder.blocks.1.attn.q_bias"], state["visual_encoder.blocks.1.attn.v_bias"] = q, v
    expected["vision_model.encoder.layers.1.self_attn.qkv.bias"] = torch.cat([q, torch.zeros(32), v])
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(128)[None]  # LAVIS saves it; dropped
    path = tmp_path_factory.mktemp("lavis") / "malmm_finetuned.pth"
    torch.save({"model": state, "epoch": 3}, path)
    return path, expected


def test_lavis_overlay_changes_exactly_the_weights_it_names(tiny_dir, lavis_checkpoint):
    path, expected = lavis_checkpoint
    base = dict(_load(tiny_dir).named_parameters())
    model = _load(tiny_dir, checkpoint=path)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, base[n])}
    assert changed == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name], value.reshape(base[name].shape))
    report = model.overlay_report
    assert sorted(report.loaded) == sorted(expected) and report.unexpected == []
    assert report.not_in_checkpoint == []


def test_overlay_reports_groups_it_does_not_contain(tiny_dir, tmp_path):
    path = tmp_path / "qformer_only.pth"
    torch.save({"model": {"Qformer.bert.embeddings.LayerNorm.bias": torch.zeros(32)}}, path)
    report = _load(tiny_dir, checkpoint=path).overlay_report
    assert report.loaded == ["qformer.embeddings.layernorm.bias"]
    assert set(report.not_in_checkpoint) == {"query tokens", "projection", "temporal position embedding"}


def test_bad_keys_are_reported_not_ignored(tiny_dir, tmp_path):
    path = tmp_path / "bad.pth"
    state = {"image_pe.weight": torch.zeros(120, 32), "llm_model.lm_head.weight": torch.zeros(3, 3),
             "query_tokens": torch.zeros(1, 31, 32)}  # unknown key; wrong shape
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="2 key"):
        _load(tiny_dir, checkpoint=path)
    model = _load(tiny_dir, checkpoint=path, strict_checkpoint=False)
    report = model.overlay_report
    assert report.loaded == ["temporal_embedding.weight"]
    assert "llm_model.lm_head.weight" in report.unexpected
    assert any(u.startswith("query_tokens (shape") for u in report.unexpected)


def test_strict_overlay_changes_nothing_when_it_fails(tiny_dir, tmp_path):
    from models.loading import load_overlay

    model = _load(tiny_dir)
    before = {n: p.clone() for n, p in model.named_parameters()}
    path = tmp_path / "half_bad.pth"
    torch.save({"model": {"image_pe.weight": torch.ones(120, 32), "nonsense": torch.ones(1)}}, path)
    with pytest.raises(CheckpointError):
        load_overlay(model, path)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", None, "fraction"])
def test_unreadable_checkpoints_give_one_clear_error(tiny_dir, tmp_path, content):
    path = tmp_path / "x.pth"
    if content is None:
        # A pickle that would run code when unpickled: weights_only refuses it.
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned",))

        path.write_bytes(pickle.dumps({"model": Evil()}))
    elif content == "fraction":  # a class torch would offer to allow-list
        from fractions import Fraction

        torch.save({"model": {"x": Fraction(1, 2)}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="x.pth") as err:
        _load(tiny_dir, checkpoint=path)
    # torch's advice (load it with weights_only=False, or allow-list its classes) is the unsafe
    # thing to do with a file from elsewhere: never passed on. One line, no terminal codes.
    message = str(err.value)
    assert "weights_only" not in message and "False" not in message and "safe_globals" not in message
    assert "\n" not in message and "\x1b" not in message
    if content is None or content == "fraction":
        assert "never unpickles" in message
    if content == "fraction":
        assert "fractions.Fraction" in message
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(tiny_dir, checkpoint=tmp_path / "missing.pth")


def test_lavis_key_mapping_examples():
    assert lavis_to_hf_key("Qformer.bert.encoder.layer.3.crossattention.self.value.weight") == (
        "qformer.encoder.layer.3.crossattention.attention.value.weight")
    assert lavis_to_hf_key("Qformer.bert.encoder.layer.3.attention.output.LayerNorm.bias") == (
        "qformer.encoder.layer.3.attention.output.LayerNorm.bias")
    assert lavis_to_hf_key("llm_proj.bias") == "language_projection.bias"
    assert lavis_to_hf_key("ln_vision.bias") == "vision_model.post_layernorm.bias"
    assert lavis_to_hf_key("visual_encoder.blocks.38.norm2.bias") == "vision_model.encoder.layers.38.layer_norm2.bias"
    assert lavis_to_hf_key("llm_model.model.embed_tokens.weight") is None


# ---- quantization -----------------------------------------------------------------------


@pytest.mark.parametrize("mode, layer_type", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantization_converts_only_llm_linear_layers(tiny_dir, pixels, mode, layer_type):
    model = _load(tiny_dir, quantization=mode, dtype=torch.bfloat16)
    converted, plain = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            (converted if type(module).__name__ == layer_type else plain).append(name)
    assert converted and all(n.startswith("language_model.model.layers.") for n in converted)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n in plain)
    assert "language_model.lm_head" in plain
    assert any(n.startswith("vision_model.") for n in plain) and any(n.startswith("qformer.") for n in plain)
    assert len(converted) == 2 * 7  # 2 LLaMA layers x (q, k, v, o, gate, up, down)
    stream = model.new_stream("what does the video describe?")
    stream.add_frames(pixels[:2])
    assert len(model.generate(stream, max_new_tokens=3, num_beams=1)) == 1


def test_unknown_quantization_mode_is_rejected(tiny_dir):
    with pytest.raises(ValueError, match="quantization"):
        _load(tiny_dir, quantization="3bit")


# ---- missing models and tokenizer checks ------------------------------------------------


def test_missing_model_names_the_repo_and_the_download_command(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = (
        "from models import MALMM, ModelNotAvailableError\n"
        "try:\n    MALMM.from_pretrained('Salesforce/instructblip-vicuna-7b', device='cpu')\n"
        "except ModelNotAvailableError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR Model 'Salesforce/instructblip-vicuna-7b' is not in the Hugging Face cache" in out.stdout, out.stderr
    assert "hf download Salesforce/instructblip-vicuna-7b" in out.stdout


def _broken_model_dir(tiny_dir, root, case: str):
    """A folder a user might pass as --model by mistake, or a damaged copy of a real one."""
    path = root / case
    if case in ("corrupt", "truncated", "no weights", "bad config", "other model"):
        shutil.copytree(tiny_dir, path)
    else:
        path.mkdir()
    weights = path / "model.safetensors"
    if case == "notes only":
        (path / "notes.txt").write_text("hello")
    elif case == "corrupt":
        weights.write_bytes(weights.read_bytes()[:1000])  # header cut short
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "no weights":
        weights.unlink()
    elif case == "bad config":
        (path / "config.json").write_text("{not json")
    elif case == "other model":
        (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return path


@pytest.mark.parametrize("case, error, needle", [
    ("empty", ModelNotAvailableError, "is an empty folder, not a model"),
    ("notes only", ModelNotAvailableError, "it has no config.json"),
    ("bad config", ModelNotAvailableError, "is not a valid model config"),
    ("other model", ModelNotAvailableError, "holds a bert model, not InstructBLIP"),
    ("no weights", ModelNotAvailableError, "has no model weights"),
    ("corrupt", CheckpointError, "are corrupt or truncated"),
    ("truncated", CheckpointError, "are corrupt or truncated"),
])
def test_a_folder_that_is_not_a_usable_model_is_one_sentence(tiny_dir, tmp_path, case, error, needle):
    with pytest.raises(error, match=needle) as caught:
        _load(_broken_model_dir(tiny_dir, tmp_path, case))
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_tokenizer_without_eos_is_rejected_at_load_time(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    config_path = broken / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = None
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="EOS"):
        _load(broken)


def test_tiny_llm_tokenizer_uses_eos_as_bos_like_instructblip_vicuna(tiny_model):
    tok = tiny_model.tokenizer
    assert tok.bos_token == tok.eos_token == "</s>" and tok.bos_token_id == tok.eos_token_id == 2
