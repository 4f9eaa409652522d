"""Every config field that names a mode, as one `str`-valued enum each: the single list of its values.

Configs keep plain strings (ml_collections, JSON, the command line); the config checks
(train/config_checks.py) and the constructors turn a field into its enum with `parse`, so
an unknown value fails the same way wherever it is first read: naming the field, the value,
the allowed values and the closest one. A member equals its string (`Remat.FULL == "full"`).

A leaf module: it imports nothing from the project, so models/, data_pipelines/ and train/
all import it without cycles.
"""

import difflib
import enum


class Mode(enum.StrEnum):
  """A config field's allowed values (subclassed once per field; FIELDS names the field)."""


class Remat(Mode):
  """model.remat: what the backward pass recomputes."""
  NONE = "none"
  FULL = "full"
  DOTS = "dots"  # save matmul outputs
  QKV = "qkv"  # save the decoder's q/k/v projections, recompute the rest
  PROJ = "proj"  # save q/k/v, the attention output projection and the MLP's (normed) input
  PROJ_OFFLOAD = "proj_offload"  # what "proj" saves, moved to host memory until the backward pass


class AttentionImpl(Mode):
  """model.attention_impl (models/attention.py)."""
  XLA = "xla"
  CUDNN = "cudnn"
  SPLASH = "splash"


class MoeImpl(Mode):
  """model.moe.impl (models/moe.py)."""
  AUTO = "auto"  # megablox on TPU, tokamax on GPU, blocked on CPU
  RAGGED = "ragged"  # dropless, jax.lax.ragged_dot
  MEGABLOX = "megablox"  # dropless, the Pallas grouped-matmul kernel (interpreted off TPU)
  BLOCKED = "blocked"  # dropless, a loop of one matmul per block of rows in one group (XLA)
  TOKAMAX = "tokamax"  # dropless, tokamax.ragged_dot: Mosaic GPU / Triton kernels (XLA's elsewhere)
  CAPACITY = "capacity"


class ConnectorKind(Mode):
  """model.connector.kind (models/connector.py)."""
  C_ABSTRACTOR = "c_abstractor"
  MLP = "mlp"


class PosResize(Mode):
  """model.vit.pos_resize: how the ViT's learned position grid is resized for other grids."""
  BILINEAR = "bilinear"
  BICUBIC = "bicubic"


class VitAct(Mode):
  """model.vit.act: the ViT MLP's activation."""
  QUICK_GELU = "quick_gelu"
  GELU = "gelu"
  GELU_TANH = "gelu_tanh"  # SigLIP's "gelu_pytorch_tanh"


class RopeScaling(Mode):
  """model.llm.rope_scaling.kind (models/llm.py, rope_frequencies)."""
  NONE = "none"
  LINEAR = "linear"
  LLAMA3 = "llama3"


class NanPolicy(Mode):
  """train.nan_policy: what a non-finite step does to the run (its update is never applied)."""
  STOP = "stop"
  SKIP = "skip"


class Component(Mode):
  """The model's parts, in order: train.trainable is "all" or a comma list of them."""
  VIT = "vit"
  CONNECTOR = "connector"
  LLM = "llm"


class Indicators(Mode):
  """data.anyres.indicators: how the text names each image tile (data_pipelines/sequence.py)."""
  INDEX = "index"
  SEPS = "seps"
  NONE = "none"


class Overlong(Mode):
  """data.overlong: what happens to a record longer than a row (data_pipelines/sequence.py)."""
  DROP = "drop"
  TRUNCATE = "truncate"


class BestMode(Mode):
  """eval.best_mode: whether a lower or a higher eval.best_metric is better."""
  MIN = "min"
  MAX = "max"


class WandbMode(Mode):
  """log.wandb.mode."""
  ONLINE = "online"
  OFFLINE = "offline"


class Objective(Mode):
  """train.objective: what a run trains (mm15_jax/train/main.py picks the loop)."""
  NEXT_TOKEN = "next_token"  # the whole model on token rows (train/loop.py)
  OBJECT_BOXES = "object_boxes"  # the image encoder alone on labelled built-in tiles (train/encoder_stage.py)


# Each mode's config field (dotted, under `config.`): what its errors name.
FIELDS = {
    Remat: "model.remat",
    AttentionImpl: "model.attention_impl",
    MoeImpl: "model.moe.impl",
    ConnectorKind: "model.connector.kind",
    PosResize: "model.vit.pos_resize",
    VitAct: "model.vit.act",
    RopeScaling: "model.llm.rope_scaling.kind",
    NanPolicy: "train.nan_policy",
    Indicators: "data.anyres.indicators",
    Overlong: "data.overlong",
    BestMode: "eval.best_mode",
    WandbMode: "log.wandb.mode",
    Objective: "train.objective",
}


def values(mode: type[Mode]) -> tuple[str, ...]:
  """The allowed strings of `mode`, in declaration order."""
  return tuple(member.value for member in mode)


def error(mode: type[Mode], value, field: str | None = None) -> str | None:
  """None if `value` is one of `mode`'s strings, else the message: `config.FIELD=VALUE`, the
  allowed values, the closest one (difflib) and the flag that sets it."""
  if isinstance(value, str) and value in mode._value2member_map_:
    return None
  field = field or FIELDS[mode]
  allowed = values(mode)
  close = difflib.get_close_matches(value, allowed, n=1) if isinstance(value, str) else []
  hint = f"; did you mean {close[0]!r}?" if close else ""
  return (f"config.{field}={value!r}: expected one of {allowed}{hint} "
          f"(e.g. --config.{field}={close[0] if close else allowed[0]})")


def parse(mode: type[Mode], value, field: str | None = None):
  """The member of `mode` that config string `value` names; a ValueError (see `error`) if none.
  `field` (dotted, without "config.") defaults to the mode's own field in FIELDS."""
  message = error(mode, value, field)
  if message is not None:
    raise ValueError(message)
  return mode(value)
