"""scripts/make_checkpoint.py: the official layout, config spellings, sharding, MTP layers, nothing half-written."""

import json
import math

import pytest
import torch
from safetensors import safe_open

import make_checkpoint
from engine.config import ModelConfig
from engine.errors import CheckpointError, run_cli
from engine.loader import INDEX_FILE, SAFETENSORS_DTYPES, load_config
from engine.presets import tiny, v3
from engine.weights import FP8_DTYPE, SCALE_SUFFIX, checkpoint_tensors
from make_checkpoint import main, mtp_tensors, plan_shards, write_checkpoint


def headers(path):
    """Name -> (shape, dtype, shard file) of every tensor in the directory's safetensors files."""
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                meta = f.get_slice(name)
                out[name] = (tuple(meta.get_shape()), SAFETENSORS_DTYPES[meta.get_dtype()], shard.name)
    return out


def run(argv, capsys):
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def test_cli_writes_the_official_fp8_layout(tmp_path, capsys):
    out = tmp_path / "ck"
    result = run(["--preset", "tiny", "--out", str(out), "--dtype", "fp8", "--num-shards", "3", "--no-progress"],
                 capsys)
    index = json.loads((out / INDEX_FILE).read_text())
    found = headers(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", *(f"model-0000{k}-of-00003.safetensors"
                                                                      for k in (1, 2, 3)), INDEX_FILE]
    assert result == {"path": str(out.resolve()), "num_tensors": len(found),
                      "total_bytes": sum(math.prod(s) * d.itemsize for s, d, _ in found.values())}
    assert index["metadata"]["total_size"] == result["total_bytes"]
    assert index["weight_map"] == {name: shard for name, (_, _, shard) in found.items()}
    raw = json.loads((out / "config.json").read_text())
    assert raw["quantization_config"]["weight_block_size"] == [128, 128] and raw["rope_scaling"]["type"] == "yarn"
    cfg = load_config(out)
    assert cfg == tiny(fp8=True)
    assert {name: (spec.shape, spec.dtype) for name, spec in checkpoint_tensors(cfg).items()} == {
        name: (shape, dtype) for name, (shape, dtype, _) in found.items()}
    assert found["model.layers.1.mlp.experts.0.down_proj.weight"][1] == FP8_DTYPE
    assert found["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"][:2] == ((1, 1), torch.float32)
    assert found["model.layers.1.mlp.gate.e_score_correction_bias"][1] == torch.float32
    assert found["model.layers.1.mlp.gate.weight"][1] == torch.bfloat16
    # A weight and its scale share a shard.
    assert all(found[n][2] == found[n + SCALE_SUFFIX][2] for n, s in checkpoint_tensors(cfg).items() if s.quantized)


def test_cli_variants(tmp_path, capsys):
    out = tmp_path / "ck"
    run(["--preset", "tiny", "--out", str(out), "--num-layers", "2", "--no-q-lora", "--no-yarn",
         "--spelling", "transformers", "--num-shards", "1", "--seed", "5", "--no-progress"], capsys)
    raw = json.loads((out / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_scaling" not in raw and raw["dtype"] == "bfloat16"
    cfg = load_config(out)
    assert cfg == tiny(num_layers=2).replace(q_lora_rank=None, rope=None)
    found = headers(out)
    assert "model.layers.0.self_attn.q_proj.weight" in found and "model.layers.0.self_attn.q_a_proj.weight" not in found
    assert {s[1] for s in found.values()} == {torch.bfloat16, torch.float32}


def test_mtp_layer(tmp_path, capsys):
    out = tmp_path / "ck"
    result = run(["--preset", "tiny", "--out", str(out), "--dtype", "fp8", "--mtp", "--no-progress"], capsys)
    cfg = load_config(out)
    assert cfg.num_nextn_predict_layers == 1
    found = headers(out)
    assert found["model.layers.3.eh_proj.weight"][:2] == ((64, 128), torch.bfloat16)
    assert found["model.layers.3.enorm.weight"][0] == (64,) and "model.layers.3.shared_head.head.weight" in found
    assert found["model.layers.3.mlp.experts.15.up_proj.weight_scale_inv"][1] == torch.float32
    assert set(found) == set(checkpoint_tensors(cfg)) | set(mtp_tensors(cfg))
    assert result["num_tensors"] == len(found)


def test_v3_specs_at_full_width():
    """The real shapes, without writing gigabytes: one dense layer, then the MTP layer (an MoE layer)."""
    cfg = v3(num_layers=1)
    mtp = mtp_tensors(cfg)
    assert mtp["model.layers.1.eh_proj.weight"].shape == (7168, 14336)
    assert mtp["model.layers.1.mlp.experts.255.down_proj.weight_scale_inv"].shape == (56, 16)
    specs = {**checkpoint_tensors(cfg), **mtp}
    shards = plan_shards(specs, 8)
    sizes = [sum(math.prod(specs[n].shape) * specs[n].dtype.itemsize for n in shard) for shard in shards]
    assert len(shards) == 8 and sum(map(len, shards)) == len(specs)
    assert max(sizes) < 1.5 * sum(sizes) / 8  # balanced: no shard much beyond its share


def test_plan_shards_keeps_pairs_and_fills_every_shard():
    cfg = tiny(num_layers=1, fp8=True)  # embed, one dense layer (5 quantized weights), norm, lm_head
    specs = checkpoint_tensors(cfg)
    units = len([n for n, s in specs.items() if not n.endswith(SCALE_SUFFIX)])
    shards = plan_shards(specs, units)
    assert all(shards) and [n for shard in shards for n in shard] == list(specs)
    assert all(n + SCALE_SUFFIX in shard for shard in shards for n in shard if specs[n].quantized)
    with pytest.raises(CheckpointError, match=f"--num-shards {units + 1}: choose 1 to {units}"):
        plan_shards(specs, units + 1)


def test_refuses_a_non_empty_directory_unless_forced(tmp_path, capsys):
    out = tmp_path / "ck"
    run(["--preset", "tiny", "--out", str(out), "--num-layers", "1", "--no-progress"], capsys)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, ["--preset", "tiny", "--out", str(out), "--no-progress"])
    assert exit_.value.code == 2
    assert "ck: directory is not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    run(["--preset", "tiny", "--out", str(out), "--force", "--no-progress"], capsys)
    assert not (out / "keep.txt").exists() and load_config(out).num_hidden_layers == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_force_replaces_only_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="--force replaces only a checkpoint directory .* no config.json"):
        write_checkpoint(tiny(), tmp_path, force=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_empty_directory_is_fine(tmp_path):
    (tmp_path / "ck").mkdir()
    assert write_checkpoint(tiny(num_layers=1), tmp_path / "ck", progress=False) == tmp_path / "ck"


def failing_after(count, real):
    def tensors(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == count:
                raise OSError("disk full")
            yield item
    return tensors


@pytest.mark.parametrize("existing", [None, [], ["config.json"]])
def test_nothing_half_written_on_failure(tmp_path, monkeypatch, existing):
    out = tmp_path / "ck"
    if existing is not None:
        out.mkdir()
        for name in existing:
            (out / name).write_text("{}")
    monkeypatch.setattr(make_checkpoint, "random_tensors", failing_after(40, make_checkpoint.random_tensors))
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tiny(), out, num_shards=3, progress=False, force=True)
    # No temporary sibling is left, and what was there before is untouched.
    assert [p.name for p in tmp_path.iterdir()] == ([] if existing is None else ["ck"])
    if existing is not None:
        assert [p.name for p in out.iterdir()] == existing


def test_bad_arguments(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="file: exists and is not a directory"):
        write_checkpoint(tiny(), tmp_path / "file", progress=False)
    with pytest.raises(CheckpointError, match="spelling 'hf'"):
        write_checkpoint(tiny(), tmp_path / "x", spelling="hf", progress=False)
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, ["--preset", "tiny", "--out", str(tmp_path / "y"), "--num-layers", "0"])
    assert exit_.value.code == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_same_seed_same_bytes(tiny_checkpoint):
    a, b, c = tiny_checkpoint(seed=1), tiny_checkpoint(seed=1), tiny_checkpoint(seed=2)
    shard = "model-00001-of-00002.safetensors"
    assert (a / shard).read_bytes() == (b / shard).read_bytes() != (c / shard).read_bytes()
    assert isinstance(load_config(a), ModelConfig)
