"""The safetensors checkpoint loader (round trips, expert selection, fp8, every bad input) and dummy weights."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import Fp8Quant
from engine.dummy import dummy_weights
from engine.errors import CheckpointError, ConfigError
from engine.loader import INDEX_FILE, load_config, load_weights, output_specs
from engine.presets import tiny, v3
from engine.weights import FP8_DTYPE, SCALE_SUFFIX, checkpoint_tensors


def stored(path):
    """Every tensor of a checkpoint directory exactly as written, read with safetensors' own loader."""
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def block_dequant(q, scale, block):
    """Independent of kernels.fp8: multiply each (possibly partial) block by its own scale, block by block."""
    out = q.float().clone()
    bn, bk = block
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] *= scale[i, j]
    return out


@pytest.mark.parametrize("spelling", ["official", "transformers"])
@pytest.mark.parametrize("fp8", [False, True])
def test_round_trip(tiny_checkpoint, fp8, spelling):
    cfg = tiny(fp8=fp8)
    path = tiny_checkpoint(cfg, spelling=spelling, seed=3)
    assert load_config(path) == cfg
    raw = stored(path)
    got = load_weights(path, cfg, progress=False)
    assert list(got) == list(output_specs(cfg))
    for name, tensor in got.items():
        spec = checkpoint_tensors(cfg)[name]
        if spec.quantized:
            assert name + SCALE_SUFFIX not in got
            want = block_dequant(raw[name], raw[name + SCALE_SUFFIX], (128, 128))
        else:
            want = raw[name].float()
        assert tensor.dtype == torch.float32 and torch.equal(tensor, want), name
    # The generator writes exactly what dummy_weights makes on the CPU, converted the same way.
    dummy = dummy_weights(cfg, dtype=torch.float32, seed=3)
    assert all(torch.equal(dummy[name], got[name]) for name in got)


def test_fp8_dequant_over_several_partial_blocks(tiny_checkpoint):
    cfg = tiny().replace(quant=Fp8Quant(block=(16, 32)))  # tiny's 40-, 48- and 96-wide matrices end in partial blocks
    path = tiny_checkpoint(cfg)
    raw = stored(path)
    got = load_weights(path, cfg, dtype=torch.bfloat16, progress=False)
    name = "model.layers.0.self_attn.q_a_proj.weight"  # [48, 64]: 3 x 2 blocks
    assert raw[name + SCALE_SUFFIX].shape == (3, 2) and raw[name + SCALE_SUFFIX].unique().numel() == 6
    for name, spec in checkpoint_tensors(cfg).items():
        if spec.quantized:
            want = block_dequant(raw[name], raw[name + SCALE_SUFFIX], (16, 32)).to(torch.bfloat16)
            assert torch.equal(got[name], want), name
    assert got["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert got["model.norm.weight"].dtype == torch.bfloat16


def test_keep_fp8_returns_weights_and_scales_as_stored(tiny_checkpoint):
    cfg = tiny(fp8=True)
    path = tiny_checkpoint(cfg)
    raw = stored(path)
    got = load_weights(path, cfg, keep_fp8=True, dtype=torch.bfloat16, progress=False)
    assert list(got) == list(checkpoint_tensors(cfg))
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert got[name].dtype == FP8_DTYPE and got[name + SCALE_SUFFIX].dtype == torch.float32
    for name, spec in checkpoint_tensors(cfg).items():
        want = raw[name] if spec.dtype in (FP8_DTYPE, torch.float32) else raw[name].to(torch.bfloat16)
        assert got[name].dtype == spec.dtype and torch.equal(got[name].view(torch.uint8), want.view(torch.uint8))


def test_expert_selection_reads_only_those_experts(tiny_checkpoint):
    cfg = tiny(fp8=True)
    path = tiny_checkpoint(cfg)
    full = load_weights(path, cfg, progress=False)
    part = load_weights(path, cfg, experts=[5, 0], progress=False)
    experts = {int(name.split(".")[5]) for name in part if ".mlp.experts." in name}
    assert experts == {0, 5}
    assert set(part) == set(output_specs(cfg, [0, 5]))
    assert all(torch.equal(part[name], full[name]) for name in part)
    with pytest.raises(ValueError, match="out of range"):
        load_weights(path, cfg, experts=[16], progress=False)


def test_mtp_layers_are_skipped(tiny_checkpoint):
    cfg = tiny()
    path = tiny_checkpoint(cfg, mtp=True)
    index = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    assert "model.layers.3.eh_proj.weight" in index and "model.layers.3.mlp.experts.0.up_proj.weight" in index
    got = load_weights(path, load_config(path), progress=False)
    assert list(got) == list(output_specs(cfg))


def test_single_file_without_index(tiny_checkpoint):
    cfg = tiny()
    path = tiny_checkpoint(cfg, num_shards=1)
    (path / "model-00001-of-00001.safetensors").rename(path / "model.safetensors")
    (path / INDEX_FILE).unlink()
    assert set(load_weights(path, cfg, progress=False)) == set(output_specs(cfg))
    with pytest.raises(CheckpointError, match="'model.layers.3.input_layernorm.weight' .*is missing"):
        load_weights(path, cfg.replace(num_hidden_layers=4), progress=False)


def test_weight_and_scale_in_different_shards(tiny_checkpoint):
    cfg = tiny(fp8=True)
    path = tiny_checkpoint(cfg)
    want = load_weights(path, cfg, progress=False)
    # The scale moves to a shard read before its weight's, and a weight to one read after its scale's.
    early = "model.layers.1.mlp.experts.2.gate_proj.weight_scale_inv"
    late = "model.layers.0.self_attn.o_proj.weight"
    index = json.loads((path / INDEX_FILE).read_text())
    for name, new in [(early, "model-00000-extra.safetensors"), (late, "model-99999-extra.safetensors")]:
        shard = shard_of(path, name)
        tensors = load_file(shard)
        save_file({name: tensors.pop(name)}, path / new)
        save_file(tensors, shard)
        index["weight_map"][name] = new
        (path / INDEX_FILE).write_text(json.dumps(index))
    got = load_weights(path, cfg, progress=False)
    assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_progress_bar_on_stderr(tiny_checkpoint, capsys):
    path = tiny_checkpoint()
    load_weights(path, tiny(), progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "loading weights" in err


# ----- bad inputs: one CheckpointError that names the thing -----

@pytest.fixture
def ckpt(tiny_checkpoint):
    return tiny_checkpoint(tiny(fp8=True))


def shard_of(path, name):
    return path / json.loads((path / INDEX_FILE).read_text())["weight_map"][name]


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nope: no such checkpoint directory"):
        load_weights(tmp_path / "nope", tiny())


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        load_config(ckpt)


def test_no_index_and_no_single_file(ckpt):
    (ckpt / INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"neither model.safetensors.index.json nor .*found model-"):
        load_weights(ckpt, tiny(fp8=True))


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny().to_official_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not unpickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*never unpickles.*arbitrary code.*safetensors"):
        load_weights(tmp_path, tiny())


def test_index_not_json(ckpt):
    (ckpt / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json: not valid JSON"):
        load_weights(ckpt, tiny(fp8=True))


def test_index_without_weight_map(ckpt):
    (ckpt / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="no 'weight_map'"):
        load_weights(ckpt, tiny(fp8=True))


def test_index_pointing_outside_the_directory(ckpt):
    index = json.loads((ckpt / INDEX_FILE).read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'\.\./elsewhere.safetensors' is not a .safetensors file name"):
        load_weights(ckpt, tiny(fp8=True))


def test_missing_shard(ckpt):
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard 'model-00002-of-00002.safetensors' .* is missing"):
        load_weights(ckpt, tiny(fp8=True))


def test_tensor_missing_from_index(ckpt):
    index = json.loads((ckpt / INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.7.up_proj.weight_scale_inv"]
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.experts.7.up_proj.weight_scale_inv' .*not in the"):
        load_weights(ckpt, tiny(fp8=True))
    # A rank that does not own expert 7 does not care.
    load_weights(ckpt, tiny(fp8=True), experts=[0, 1], progress=False)


def rewrite_shard(path, name, change):
    """Rewrites the shard holding `name` with `change(tensors)` applied (a valid safetensors file)."""
    shard = shard_of(path, name)
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_tensor_missing_from_shard(ckpt):
    name = "model.layers.2.self_attn.kv_a_layernorm.weight"
    rewrite_shard(ckpt, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"'{name}' is missing; .*index and shards come from different"):
        load_weights(ckpt, tiny(fp8=True))


def test_wrong_shape(ckpt):
    name = "model.layers.0.self_attn.kv_a_layernorm.weight"
    rewrite_shard(ckpt, name, lambda t: t.update({name: torch.ones(31, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \(31,\) torch.bfloat16, expected \(32,\)"):
        load_weights(ckpt, tiny(fp8=True))


def test_wrong_dtype(tiny_checkpoint):
    path = tiny_checkpoint(tiny(fp8=True))
    with pytest.raises(CheckpointError, match=r"float8_e4m3fn, expected \(\d+, \d+\) torch.bfloat16"):
        load_weights(path, tiny(fp8=False))


def test_bf16_weights_with_fp8_config(tiny_checkpoint):
    path = tiny_checkpoint(tiny(fp8=False))
    with pytest.raises(CheckpointError, match="q_a_proj.weight_scale_inv' .*remove quantization_config"):
        load_weights(path, tiny(fp8=True))


def test_truncated_shard(ckpt):
    shard = ckpt / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: .*truncated or corrupt"):
        load_weights(ckpt, tiny(fp8=True))


def test_corrupt_header(ckpt):
    shard = ckpt / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:8] + b"}" + data[9:])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: .*truncated or corrupt"):
        load_weights(ckpt, tiny(fp8=True))


# ----- dummy weights -----

def assert_matches(weights, specs):
    assert list(weights) == list(specs)
    for name, spec in specs.items():
        assert tuple(weights[name].shape) == spec.shape and weights[name].dtype == spec.dtype, name


def test_dummy_matches_spec_table_bf16():
    cfg = tiny()
    w = dummy_weights(cfg)
    assert_matches(w, checkpoint_tensors(cfg))  # bf16 checkpoint: the stored dtypes (bias fp32) are the loaded ones
    assert_matches(w, output_specs(cfg, dtype=torch.bfloat16))
    assert all(torch.isfinite(t).all() for t in w.values())
    norm = w["model.layers.0.input_layernorm.weight"].float()
    assert (norm - 1).abs().max() < 0.5
    bias = w["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.abs().max() < 0.2 and (bias > 0).any() and (bias < 0).any()
    proj = w["model.layers.0.mlp.down_proj.weight"].float()  # [64, 128]
    assert proj.std().item() == pytest.approx(128**-0.5, rel=0.1)


def test_dummy_fp8_keep_matches_spec_table():
    cfg = tiny(fp8=True)
    w = dummy_weights(cfg, keep_fp8=True)
    assert_matches(w, checkpoint_tensors(cfg))
    w = dummy_weights(cfg, dtype=torch.float32)
    assert_matches(w, output_specs(cfg, dtype=torch.float32))
    proj = w["model.layers.1.mlp.shared_experts.gate_proj.weight"]  # [32, 64]
    assert proj.std().item() == pytest.approx(64**-0.5, rel=0.25)


def test_dummy_experts_are_a_slice_of_the_whole():
    cfg = tiny()
    whole = dummy_weights(cfg, seed=7)
    part = dummy_weights(cfg, experts=[3, 9], seed=7)
    assert set(part) == set(output_specs(cfg, [3, 9]))
    assert all(torch.equal(part[name], whole[name]) for name in part)
    assert not torch.equal(dummy_weights(cfg, seed=8)["lm_head.weight"], whole["lm_head.weight"])


@pytest.mark.parametrize("num_layers", [1, 4])
def test_dummy_v3_on_meta_allocates_nothing(num_layers):
    cfg = v3(num_layers)
    assert_matches(dummy_weights(cfg, device="meta", keep_fp8=True), checkpoint_tensors(cfg))
    w = dummy_weights(cfg, device="meta", experts=range(32))
    assert_matches(w, output_specs(cfg, range(32), dtype=torch.bfloat16))
    assert all(t.is_meta for t in w.values())
    assert w["model.embed_tokens.weight"].shape == (129280, 7168)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_dummy_on_gpu_matches_loader_conversion():
    cfg = tiny(fp8=True)
    w = dummy_weights(cfg, device="cuda", dtype=torch.bfloat16)
    assert_matches(w, output_specs(cfg, dtype=torch.bfloat16))
    assert all(t.is_cuda and torch.isfinite(t).all() for t in w.values())



def test_lazy_dummy_weights_equal_eager_and_forget_popped():
    from engine.dummy import LazyDummyWeights, dummy_weights

    for cfg, keep in [(tiny(), False), (tiny(fp8=True), True), (tiny(fp8=True), False)]:
        eager = dummy_weights(cfg, experts=[1, 5], dtype=torch.float32, keep_fp8=keep, seed=4)
        lazy = LazyDummyWeights(cfg, experts=[1, 5], dtype=torch.float32, keep_fp8=keep, seed=4)
        assert sorted(lazy) == sorted(eager)
        for name in eager:
            assert torch.equal(lazy[name], eager[name]), name
        name = "model.layers.1.mlp.experts.5.down_proj.weight"
        lazy.pop(name)
        assert name not in lazy and len(lazy) == len(eager) - 1
        with pytest.raises(KeyError):
            lazy["model.layers.1.mlp.experts.2.down_proj.weight"]
