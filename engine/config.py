"""DeepSeek-V3/R1 hyper-parameters read from `config.json` into one frozen, validated dataclass.

Two spellings are accepted:
- the official release: `rope_scaling` with `type: yarn`, `rope_theta`, `torch_dtype`;
- the one transformers >= 5 writes: `rope_parameters` (holding `rope_type` and `rope_theta`), `dtype`,
  `rope_interleave`.
Every value the model relies on is checked here, once, and a bad one is rejected with a message that names the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

_DTYPES = {"bfloat16", "float16", "float32"}


@dataclass(frozen=True)
class YarnRope:
    """YaRN context extension as DeepSeek-V3 configures it (`rope_scaling` / `rope_parameters`)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @staticmethod
    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    @property
    def cos_sin_scale(self) -> float:
        """Factor on cos/sin of the rotary embedding (1.0 for DeepSeek-V3, where mscale == mscale_all_dim)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self.get_mscale(self.factor, self.mscale) / self.get_mscale(self.factor, self.mscale_all_dim)
        return self.get_mscale(self.factor)

    @property
    def softmax_mscale(self) -> float:
        """Factor on the softmax scale: mscale(factor, mscale_all_dim) squared, as the official model applies it."""
        if not self.mscale_all_dim:
            return 1.0
        return self.get_mscale(self.factor, self.mscale_all_dim) ** 2


@dataclass(frozen=True)
class Fp8Quant:
    """Block-scaled FP8 weights: e4m3 with one fp32 `weight_scale_inv` per `block` of a weight matrix."""

    block: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    first_k_dense_replace: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_theta: float = 10000.0
    rope: YarnRope | None = None
    rope_interleave: bool = True
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    dtype: str = "bfloat16"
    quant: Fp8Quant | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ----- derived values -----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the compressed latent plus the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        return scale * self.rope.softmax_mscale if self.rope is not None else scale

    @property
    def moe_layers(self) -> list[int]:
        return list(range(self.first_k_dense_replace, self.num_hidden_layers))

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` applied and validated again (e.g. fewer layers for a benchmark)."""
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        values.update(changes)
        return ModelConfig(**values)

    def __post_init__(self) -> None:
        _validate(self)

    # ----- reading and writing -----
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        return _parse(raw, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file; a model directory needs the config.json of its checkpoint")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err}); restore the checkpoint's config.json") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object of model keys, found {type(raw).__name__}")
        return _parse(raw, str(path))

    def to_official_dict(self) -> dict[str, Any]:
        """The config in the official release's spelling (what the checkpoint generator writes)."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "n_shared_experts": self.n_shared_experts,
            "n_routed_experts": self.n_routed_experts,
            "routed_scaling_factor": self.routed_scaling_factor,
            "kv_lora_rank": self.kv_lora_rank,
            "q_lora_rank": self.q_lora_rank,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "topk_method": "noaux_tc",
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_layer_freq": 1,
            "first_k_dense_replace": self.first_k_dense_replace,
            "norm_topk_prob": self.norm_topk_prob,
            "scoring_func": "sigmoid",
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "torch_dtype": self.dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.rope is not None:
            rope = {k: v for k, v in asdict(self.rope).items() if v is not None and k != "truncate"}
            if not self.rope.truncate:
                rope["truncate"] = False
            out["rope_scaling"] = {"type": "yarn", **rope}
        if self.quant is not None:
            out["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": self.quant.activation_scheme,
                "weight_block_size": list(self.quant.block),
            }
        return out

    def to_transformers_dict(self) -> dict[str, Any]:
        """The config in the spelling transformers >= 5 writes (`rope_parameters`, `dtype`, `rope_interleave`)."""
        out = self.to_official_dict()
        out.pop("rope_scaling")
        out.pop("rope_theta")
        out["dtype"] = out.pop("torch_dtype")
        out["rope_interleave"] = self.rope_interleave
        out["num_mtp_layers"] = out.pop("num_nextn_predict_layers")
        params: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope is not None:
            params = {"rope_type": "yarn", "rope_theta": self.rope_theta}
            params.update({k: v for k, v in asdict(self.rope).items() if v is not None})
        out["rope_parameters"] = params
        return out


def _require(raw: dict[str, Any], key: str, kind: type, source: str, *, allow_none: bool = False) -> Any:
    if key not in raw:
        raise ConfigError(f"{source}: missing key '{key}', which DeepSeek-V3 needs; add it to config.json")
    value = raw[key]
    if value is None and allow_none:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{source}: key '{key}' must be {kind.__name__}, found {value!r}")
    return value


def _parse_rope(raw: dict[str, Any], source: str) -> tuple[float, YarnRope | None]:
    """Reads the rotary settings from either spelling; returns (rope_theta, yarn or None)."""
    if raw.get("rope_parameters") is not None:
        params, key = dict(raw["rope_parameters"]), "rope_parameters"
        theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
        kind = params.pop("rope_type", params.pop("type", "default"))
    elif raw.get("rope_scaling") is not None:
        params, key = dict(raw["rope_scaling"]), "rope_scaling"
        theta = raw.get("rope_theta", 10000.0)
        kind = params.pop("type", params.pop("rope_type", "default"))
    else:
        return float(raw.get("rope_theta", 10000.0)), None
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"{source}: 'rope_theta' must be a positive number, found {theta!r}")
    if kind == "default":
        return float(theta), None
    if kind != "yarn":
        raise ConfigError(f"{source}: '{key}' type '{kind}' is not supported; DeepSeek-V3 uses 'yarn' (or no scaling)")
    if "factor" not in params:
        raise ConfigError(f"{source}: '{key}' of type yarn needs 'factor'")
    original = params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 4096))
    known = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate", "partial_rotary_factor"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{source}: '{key}' has keys {unknown} this engine does not know; remove them")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{source}: '{key}.partial_rotary_factor' must be 1.0 for DeepSeek-V3")
    try:
        yarn = YarnRope(
            factor=float(params["factor"]),
            original_max_position_embeddings=int(original),
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            mscale=None if params.get("mscale") is None else float(params["mscale"]),
            mscale_all_dim=None if params.get("mscale_all_dim") is None else float(params["mscale_all_dim"]),
            attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
            truncate=bool(params.get("truncate", True)),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: '{key}' holds a value that is not a number ({err})") from None
    if yarn.factor <= 0:
        raise ConfigError(f"{source}: '{key}.factor' must be positive, found {yarn.factor}")
    return float(theta), yarn


def _parse_quant(raw: dict[str, Any], source: str) -> Fp8Quant | None:
    q = raw.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"{source}: 'quantization_config' must be an object")
    if q.get("quant_method") != "fp8":
        raise ConfigError(
            f"{source}: 'quantization_config.quant_method' = {q.get('quant_method')!r} is not supported; "
            "use an fp8 (e4m3, 128x128 blocks) or bf16 checkpoint"
        )
    if q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"{source}: 'quantization_config.fmt' must be 'e4m3', found {q.get('fmt')!r}")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"{source}: 'quantization_config.weight_block_size' must be two positive ints, found {block!r}")
    return Fp8Quant(block=(block[0], block[1]), activation_scheme=str(q.get("activation_scheme", "dynamic")))


def _parse(raw: dict[str, Any], source: str) -> ModelConfig:
    scoring = raw.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ConfigError(f"{source}: 'scoring_func' = {scoring!r}; DeepSeek-V3 routing needs 'sigmoid'")
    method = raw.get("topk_method", "noaux_tc")
    if method != "noaux_tc":
        raise ConfigError(f"{source}: 'topk_method' = {method!r}; DeepSeek-V3 routing needs 'noaux_tc'")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: 'hidden_act' = {raw.get('hidden_act')!r}; only 'silu' is supported")
    if raw.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"{source}: 'moe_layer_freq' must be 1 (every layer after the dense ones is MoE)")
    if raw.get("attention_bias", False):
        raise ConfigError(f"{source}: 'attention_bias' must be false for DeepSeek-V3")
    heads = _require(raw, "num_attention_heads", int, source)
    kv_heads = raw.get("num_key_value_heads", heads)
    if kv_heads not in (None, heads):
        raise ConfigError(f"{source}: 'num_key_value_heads' must equal 'num_attention_heads' ({heads}) for MLA")
    theta, yarn = _parse_rope(raw, source)
    dtype = raw.get("torch_dtype", raw.get("dtype", "bfloat16")) or "bfloat16"
    if dtype not in _DTYPES:
        raise ConfigError(f"{source}: 'torch_dtype' = {dtype!r}; expected one of {sorted(_DTYPES)}")
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    mtp = raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers", 0)) or 0
    n_routed = _require(raw, "n_routed_experts", int, source)
    known = set(ModelConfig.__dataclass_fields__)
    return ModelConfig(
        vocab_size=_require(raw, "vocab_size", int, source),
        hidden_size=_require(raw, "hidden_size", int, source),
        intermediate_size=_require(raw, "intermediate_size", int, source),
        moe_intermediate_size=_require(raw, "moe_intermediate_size", int, source),
        num_hidden_layers=_require(raw, "num_hidden_layers", int, source),
        num_attention_heads=heads,
        n_routed_experts=n_routed,
        n_shared_experts=_require(raw, "n_shared_experts", int, source),
        num_experts_per_tok=_require(raw, "num_experts_per_tok", int, source),
        n_group=raw.get("n_group") or 1,
        topk_group=raw.get("topk_group") or 1,
        routed_scaling_factor=_require(raw, "routed_scaling_factor", float, source),
        first_k_dense_replace=raw.get("first_k_dense_replace") or 0,
        kv_lora_rank=_require(raw, "kv_lora_rank", int, source),
        q_lora_rank=_require(raw, "q_lora_rank", int, source, allow_none=True),
        qk_nope_head_dim=_require(raw, "qk_nope_head_dim", int, source),
        qk_rope_head_dim=_require(raw, "qk_rope_head_dim", int, source),
        v_head_dim=_require(raw, "v_head_dim", int, source),
        rope_theta=theta,
        rope=yarn,
        rope_interleave=bool(raw.get("rope_interleave", True)),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        num_nextn_predict_layers=int(mtp),
        dtype=dtype,
        quant=_parse_quant(raw, source),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos,
        extra={k: v for k, v in raw.items() if k not in known},
    )


def _validate(c: ModelConfig) -> None:
    positive = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
    for key in positive:
        value = getattr(c, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"config: '{key}' must be a positive integer, found {value!r}")
    if c.q_lora_rank is not None and (not isinstance(c.q_lora_rank, int) or c.q_lora_rank <= 0):
        raise ConfigError(f"config: 'q_lora_rank' must be a positive integer or null, found {c.q_lora_rank!r}")
    if c.n_shared_experts < 0:
        raise ConfigError(f"config: 'n_shared_experts' must be >= 0, found {c.n_shared_experts}")
    if c.qk_rope_head_dim % 2:
        raise ConfigError(f"config: 'qk_rope_head_dim' must be even (rotary pairs), found {c.qk_rope_head_dim}")
    if c.n_routed_experts % c.n_group:
        raise ConfigError(
            f"config: 'n_routed_experts' = {c.n_routed_experts} is not divisible by 'n_group' = {c.n_group}"
        )
    if c.topk_group > c.n_group:
        raise ConfigError(f"config: 'topk_group' = {c.topk_group} must be <= 'n_group' = {c.n_group}")
    if c.n_group > 1 and c.experts_per_group < 2:
        raise ConfigError(
            "config: each expert group needs >= 2 experts (group score = sum of its top-2); "
            f"'n_routed_experts' / 'n_group' = {c.experts_per_group}"
        )
    if c.topk_group * c.experts_per_group < c.num_experts_per_tok:
        raise ConfigError(
            f"config: 'num_experts_per_tok' = {c.num_experts_per_tok} exceeds the experts in the selected groups "
            f"('topk_group' {c.topk_group} x {c.experts_per_group} experts per group)"
        )
    if not 0 <= c.first_k_dense_replace <= c.num_hidden_layers:
        raise ConfigError(
            f"config: 'first_k_dense_replace' = {c.first_k_dense_replace} must lie in [0, 'num_hidden_layers']"
        )
    if c.routed_scaling_factor <= 0:
        raise ConfigError(f"config: 'routed_scaling_factor' must be positive, found {c.routed_scaling_factor}")
    if c.num_nextn_predict_layers < 0:
        raise ConfigError("config: 'num_nextn_predict_layers' must be >= 0")
