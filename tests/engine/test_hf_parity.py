"""The oracle: transformers' DeepseekV3ForCausalLM on tiny random checkpoints written in the official format.

Logits must agree to fp32 rounding and greedy tokens must match, for bf16 and fp8 checkpoints (the oracle holds the
fp8 weights dequantized independently here), both config spellings, with and without q-LoRA and YaRN, and with
strongly negative `e_score_correction_bias` values.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.build import ModelSource, build_model
from engine.presets import tiny
from engine.runner import Request, Runner
from engine.sampling import SamplingParams
from make_checkpoint import write_checkpoint

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
PROMPT = [5, 99, 17, 3, 250, 77, 401, 12, 9, 300, 44, 8, 123]
NEW_TOKENS = 6


def shift_bias(ckpt: Path, shift: float) -> None:
    """Spreads and moves every `e_score_correction_bias` (x4, + shift).

    With shift -1.5 most biases fall below -1, so biased scores (sigmoid in (0, 1) plus bias) of experts in kept
    groups are negative: a 0.0 group mask instead of -inf would pick excluded experts over them.
    """
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted({f for n, f in index.items() if n.endswith("e_score_correction_bias")}):
        tensors = load_file(ckpt / shard)
        for name in tensors:
            if name.endswith("e_score_correction_bias"):
                tensors[name] = tensors[name] * 4 + shift
        save_file(tensors, ckpt / shard, metadata={"format": "pt"})


def dequantized_copy(ckpt: Path, out: Path) -> Path:
    """An fp32 copy of an fp8 checkpoint for the oracle, dequantized with plain tensor ops (not our kernel)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    block = cfg.pop("quantization_config")["weight_block_size"]
    tensors = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    plain = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        if scale is not None:
            n, k = t.shape
            full = scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
            t = t.to(torch.float32) * full
        plain[name] = t.to(torch.float32).contiguous()
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(plain, out / "model.safetensors", metadata={"format": "pt"})
    return out


def oracle(path: Path):
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def oracle_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step (no cache on the oracle side)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


CASES = {
    "bf16-official-qlora-yarn": dict(cfg=tiny(), spelling="official"),
    "bf16-transformers-noqlora-noyarn": dict(cfg=tiny().replace(q_lora_rank=None, rope=None, rope_theta=5000.0),
                                             spelling="transformers"),
    "bf16-halfrot-negative-bias": dict(cfg=tiny().replace(rope_interleave=False), spelling="transformers",
                                       bias_shift=-1.5),
    "fp8-official-multiblock-negative-bias": dict(
        cfg=tiny(fp8=True).replace(hidden_size=160, intermediate_size=272, moe_intermediate_size=144),
        spelling="official", bias_shift=-1.5),
    "fp8-transformers-noqlora-mtp": dict(cfg=tiny(fp8=True).replace(q_lora_rank=None), spelling="transformers",
                                         mtp=True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    spec = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    ckpt = write_checkpoint(spec["cfg"], root / "ckpt", seed=7, num_shards=3, spelling=spec["spelling"],
                            mtp=spec.get("mtp", False), progress=False)
    if "bias_shift" in spec:
        shift_bias(ckpt, spec["bias_shift"])
    ref_dir = dequantized_copy(ckpt, root / "oracle") if spec["cfg"].quant else ckpt
    return ckpt, oracle(ref_dir)


def test_logits_and_greedy_tokens_match_transformers(case):
    ckpt, ref = case
    source = ModelSource.resolve(str(ckpt))
    model = build_model(source, device=torch.device("cpu"), dtype=torch.float32, progress=False)
    req = Request(0, PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    Runner(model).generate([req], prompt_logits=True)
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0].float()
    err = ((req.prompt_logits - expected).norm() / expected.norm()).item()
    assert err < 1e-4, f"relative logit error {err:.2e}"
    assert req.output_ids == oracle_greedy(ref, PROMPT, NEW_TOKENS)


def test_generate_cli_contract(tmp_path):
    cfg = tiny()
    ckpt = write_checkpoint(cfg, tmp_path / "ckpt", seed=3, progress=False)
    logits_file = tmp_path / "logits.safetensors"
    run = subprocess.run(
        [sys.executable, "-m", "engine.generate", "--model", str(ckpt), "--input-ids", "3 17 99",
         "--max-new-tokens", "4", "--ignore-eos", "--logits-out", str(logits_file)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(out["output_ids"]) == 4
    logits = load_file(logits_file)
    assert list(logits) == ["logits"]
    assert logits["logits"].shape == (3, cfg.vocab_size) and logits["logits"].dtype == torch.float32
    # The last prompt position's logits choose the first new token (greedy).
    assert int(logits["logits"][-1].argmax()) == out["output_ids"][0]

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"input_ids": [3, 17, 99]}\n{"input_ids": [5]}\n')
    run = subprocess.run(
        [sys.executable, "-m", "engine.generate", "--model", str(ckpt), "--prompts-file", str(prompts),
         "--max-new-tokens", "4", "--ignore-eos"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    lines = [json.loads(x) for x in run.stdout.strip().splitlines()]
    assert len(lines) == 2 and lines[0] == out


def test_generate_with_prompt_text_and_tokenizer(tmp_path):
    """`--prompt TEXT` encodes with the model directory's tokenizer.json and decodes the new tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = tiny()
    ckpt = write_checkpoint(cfg, tmp_path / "ckpt", seed=3, progress=False)
    vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(ckpt / "tokenizer.json"))
    run = subprocess.run(
        [sys.executable, "-m", "engine.generate", "--model", str(ckpt), "--prompt", "w3 w17 w99",
         "--max-new-tokens", "4", "--ignore-eos"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    ids = subprocess.run(
        [sys.executable, "-m", "engine.generate", "--model", str(ckpt), "--input-ids", "3 17 99",
         "--max-new-tokens", "4", "--ignore-eos"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert out["output_ids"] == json.loads(ids.stdout.strip().splitlines()[-1])["output_ids"]
    assert out["text"].split() == [f"w{i}" for i in out["output_ids"]]
    missing = subprocess.run([sys.executable, "-m", "engine.generate", "--model", "tiny", "--prompt", "hi"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert missing.returncode == 2 and "tokenizer.json" in missing.stderr
