"""Checkpoints: bit-exact round trips, fla's layout written by hand, sharded files, every error,
and atomic writes."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hgrn2mini import CheckpointError, HGRN2Config, HGRN2ForCausalLM
from hgrn2mini import checkpoint as ckpt

D, L, VOCAB, K = 32, 2, 50, 8
I = 256  # 256 * ceil(int(32 * 4 * 2/3) / 256)


def config(**overrides):
    return HGRN2Config(**{**dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L, expand_ratio=K),
                          **overrides})


def model(tied=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = HGRN2ForCausalLM(config(tie_word_embeddings=tied))
    with torch.no_grad():  # every tensor distinct from its init, so a skipped copy shows
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    return m.to(dtype)


def stored(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def fla_tensors(tied=False):
    """The tensors of an fla HGRN2ForCausalLM, named as fla names them, bf16 as fla ships."""
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    t = {"model.embeddings.weight": r(VOCAB, D), "model.lower_bounds": r(L, D), "model.norm.weight": r(D)}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + "attn_norm.weight": r(D), p + "mlp_norm.weight": r(D),
                  p + "attn.g_norm.weight": r(D).float(),  # fla keeps g_norm in fp32
                  p + "mlp.gate_proj.weight": r(I, D), p + "mlp.up_proj.weight": r(I, D),
                  p + "mlp.down_proj.weight": r(D, I)})
        for name in ("q", "f", "i", "o"):
            t[p + f"attn.{name}_proj.weight"] = r(D, D)
    if not tied:
        t["lm_head.weight"] = r(VOCAB, D)
    return t


def fla_config(tied=False):
    """config.json as fla + transformers write it: more keys than hgrn2mini uses."""
    return {
        "architectures": ["HGRN2ForCausalLM"], "attn": None, "attn_mode": "chunk", "bos_token_id": 1,
        "conv_size": 4, "elementwise_affine": True, "eos_token_id": 2, "expand_ratio": K,
        "fuse_cross_entropy": True, "fuse_linear_cross_entropy": False, "fuse_norm": True,
        "fuse_swiglu": True, "hidden_act": "swish", "hidden_ratio": 4, "hidden_size": D,
        "initializer_range": 0.02, "intermediate_size": None, "max_position_embeddings": 2048,
        "model_type": "hgrn2", "norm_eps": 1e-06, "num_heads": D // K, "num_hidden_layers": L,
        "pad_token_id": None, "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
        "transformers_version": "4.53.3", "use_cache": True, "use_l2warp": False,
        "use_lower_bound": True, "use_short_conv": False, "vocab_size": VOCAB, "attnres_block_size": None,
    }


def write_fla(directory, tied=False, tensors=None, cfg=None):
    directory.mkdir(exist_ok=True)
    tensors = fla_tensors(tied) if tensors is None else tensors
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(fla_config(tied) if cfg is None else cfg))
    return tensors


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_exact(tmp_path, dtype, tied):
    m = model(tied, dtype)
    m.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files left
    on_disk = stored(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in on_disk) == (not tied)  # tied: stored once, as fla and HF do
    assert all(t.dtype == dtype for t in on_disk.values())

    loaded = HGRN2ForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == m.config
    want, got = m.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name
    assert (loaded.lm_head.weight is loaded.model.embeddings.weight) == tied
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    ids = torch.randint(0, VOCAB, (2, 7))
    assert torch.equal(loaded(ids).logits, m(ids).logits)


def test_from_pretrained_dtype_and_device(tmp_path):
    m = model()
    m.save_pretrained(tmp_path)
    loaded = HGRN2ForCausalLM.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    for name, t in loaded.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, m.state_dict()[name].bfloat16()), name


def test_loaded_model_trains(tmp_path):
    model(tied=True).save_pretrained(tmp_path)
    m = HGRN2ForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 9))
    m(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_config_json_is_fla_config(tmp_path):
    model(tied=True).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "hgrn2" and cfg["architectures"] == ["HGRN2ForCausalLM"]
    assert cfg["tie_word_embeddings"] is True and cfg["num_heads"] == D // K and cfg["expand_ratio"] == K


# ----------------------------------------------------------------------------------------------
# fla's layout
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_fla_checkpoint_loads_key_for_key(tmp_path, tied):
    tensors = write_fla(tmp_path, tied)
    m = HGRN2ForCausalLM.from_pretrained(tmp_path)
    assert m.config.intermediate_size == I and m.config.num_heads == D // K
    sd = m.state_dict()
    for name, t in tensors.items():
        assert sd[name].dtype == t.dtype and torch.equal(sd[name], t), name
    if tied:
        assert m.lm_head.weight is m.model.embeddings.weight
    logits = m(torch.randint(0, VOCAB, (1, 5))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_tied_checkpoint_that_also_stores_the_head_loads(tmp_path):
    tensors = fla_tensors(tied=True)
    tensors["lm_head.weight"] = tensors["model.embeddings.weight"].clone()
    write_fla(tmp_path, tied=True, tensors=tensors)
    m = HGRN2ForCausalLM.from_pretrained(tmp_path)
    assert m.lm_head.weight is m.model.embeddings.weight
    assert torch.equal(m.lm_head.weight, tensors["model.embeddings.weight"])


def test_sharded_checkpoint_loads(tmp_path):
    tensors = fla_tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(fla_config()))
    sd = HGRN2ForCausalLM.from_pretrained(tmp_path).state_dict()
    for name, t in tensors.items():
        assert torch.equal(sd[name], t), name

    # An index that maps a tensor to a shard that lacks it names both.
    weight_map["model.extra"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002.safetensors lacks .*model\.extra"):
        HGRN2ForCausalLM.from_pretrained(tmp_path)
    weight_map.pop("model.extra")
    weight_map["model.norm.weight"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"shard '\.\./elsewhere\.safetensors'"):
        HGRN2ForCausalLM.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_missing_unexpected_and_misshapen_are_listed_together(tmp_path):
    tensors = fla_tensors()
    del tensors["model.layers.0.attn.q_proj.weight"], tensors["lm_head.weight"]
    tensors["model.layers.0.attn.q_conv1d.weight"] = torch.zeros(D, 4)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(I + 1, D)
    tensors["model.norm.weight"] = torch.zeros(D, dtype=torch.int32)
    write_fla(tmp_path, tensors=tensors)
    with pytest.raises(CheckpointError) as e:
        HGRN2ForCausalLM.from_pretrained(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg
    assert "missing (2): lm_head.weight, model.layers.0.attn.q_proj.weight" in msg
    assert "unexpected (1): model.layers.0.attn.q_conv1d.weight" in msg
    assert f"misshapen (1): model.layers.1.mlp.up_proj.weight: expected [{I}, {D}], got [{I + 1}, {D}]" in msg
    assert "wrong dtype (1): model.norm.weight" in msg


def test_truncated_file_error_names_the_file(tmp_path):
    model().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        HGRN2ForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("garbage", [b"\xff" * 64, b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"])
def test_corrupt_file_error_names_the_file(tmp_path, garbage):
    model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(garbage)
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        HGRN2ForCausalLM.from_pretrained(tmp_path)


def test_other_model_config_is_refused(tmp_path):
    write_fla(tmp_path, cfg={**fla_config(), "model_type": "llama"})
    with pytest.raises(ValueError, match="model_type must be 'hgrn2', got 'llama'"):
        HGRN2ForCausalLM.from_pretrained(tmp_path)


def test_config_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HGRN2ForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{ broken")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        HGRN2ForCausalLM.from_pretrained(tmp_path)


def test_pickles_are_never_loaded(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(fla_config()))
    torch.save(fla_tensors(), tmp_path / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*pickle"):
        HGRN2ForCausalLM.from_pretrained(tmp_path)
    write_fla(tmp_path)  # with a safetensors file beside it, that one is read, the pickle ignored
    HGRN2ForCausalLM.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = tmp_path / "state.bin"
    ckpt.atomic_write_bytes(path, b"old contents")

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"new but incompl")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["state.bin"]  # the temporary file is gone
    ckpt.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"


def test_save_pretrained_failing_midway_leaves_previous_checkpoint(tmp_path, monkeypatch):
    old = model(seed=0)
    old.save_pretrained(tmp_path)

    def partial_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt  # the process interrupted mid-write, not only an exception

    monkeypatch.setattr(ckpt, "save_file", partial_save_file)
    with pytest.raises(KeyboardInterrupt):
        model(seed=1).save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = HGRN2ForCausalLM.from_pretrained(tmp_path)
    for name, t in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_atomic_save_file_round_trips(tmp_path):
    t = {"a": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(2, dtype=torch.bfloat16)}  # a: non-contiguous
    ckpt.atomic_save_file(t, tmp_path / "x.safetensors", metadata={"step": "3"})
    got = stored(tmp_path / "x.safetensors")
    assert torch.equal(got["a"], t["a"]) and torch.equal(got["b"], t["b"])
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"step": "3"}


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    """Checkpoints are readable by whoever could read a file written with open(): mkstemp's 0600
    is not kept."""
    import os

    from hgrn2mini.checkpoint import atomic_write_bytes

    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f.bin", b"abc")
    finally:
        os.umask(umask)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644
