"""Shared experiment defaults: model sizes as a table, stages as a few overrides.

Experiment files in `experiments/` call `mm15(size, stage)` and change the handful
of keys that make them different. Dimensions and stages: docs/recipe.md; the LLM shapes are
AXLearn's public "fuji" family (Apple did not publish MM1.5's), the encoder is the
open_clip ViT-H/14-378 shape, the connector is honeybee's C-Abstractor.
"""

import importlib.util
import math
import os

import ml_collections

# Decoder LLM sizes, one row each: adding a size is adding its row. `nominal_params`: the count a
# paper size is named for (MM1's learning-rate rule, the size tests); a test model has none, and
# `mm15()` builds paper sizes only. The rest is the decoder's shape (`head_dim` = d_model / n_heads
# unless given).
LLM_SIZES = {
    # 30B: 52 heads do not split into 8 KV groups; 4 KV heads (13 queries each) is our choice.
    "30b": dict(nominal_params=30e9, n_layers=60, d_model=6656, n_heads=52, n_kv_heads=4, mlp_dim=17920),
    "7b": dict(nominal_params=7e9, n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, mlp_dim=11008),
    "3b": dict(nominal_params=3e9, n_layers=28, d_model=3072, n_heads=24, n_kv_heads=8, mlp_dim=8192),
    "1b": dict(nominal_params=1e9, n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8, mlp_dim=8192),
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, mlp_dim=192),
}

# The paper sizes, smallest first -> their nominal parameter counts.
NOMINAL_PARAMS = dict(sorted(((size, row["nominal_params"]) for size, row in LLM_SIZES.items()
                              if "nominal_params" in row), key=lambda item: item[1]))

# MM1.5's MoE sizes: 64 experts, top-2, MoE in every other decoder layer, experts the size
# of the dense FFN (so they can be upcycled from it). MM1's 7B-MoE: 32 experts, every 4th.
MOE_SIZES = {
    "1b": dict(num_experts=64, top_k=2, interval=2),
    "3b": dict(num_experts=64, top_k=2, interval=2),
    "7b": dict(num_experts=32, top_k=2, interval=4),
}

VIT_SIZES = {
    # open_clip ViT-H-14-378 (DFN-5B): 27x27 patches at 378 px, QuickGELU.
    "H/14": dict(patch_size=14, width=1280, depth=32, heads=16, mlp_dim=5120, act="quick_gelu"),
    "L/14": dict(patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096, act="quick_gelu"),
    "tiny": dict(patch_size=8, width=32, depth=2, heads=2, mlp_dim=64, act="quick_gelu"),
}


# Encoder layouts of the public towers (mm15_jax.convert imports them): CLIP has a class token,
# a LayerNorm before the blocks and no patch bias; SigLIP has none of those but a patch bias and
# a LayerNorm after the blocks. pos_resize: how the learned position grid is resized for other
# image sizes ("bicubic" as torch's interpolate, which the public models were tuned with).
# image_mean/std: the pixel normalisation the encoder was trained with.
VIT_LAYOUT = {
    "clip": dict(class_token=True, pre_norm=True, post_norm=False, patch_bias=False, pos_resize="bilinear",
                 image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711)),
    "siglip": dict(class_token=False, pre_norm=False, post_norm=True, patch_bias=True, pos_resize="bicubic",
                   image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
}


def peak_learning_rate(num_params: float) -> float:
  """MM1's size rule: eta = exp(-0.4214 ln N - 0.5535), N in parameters."""
  return math.exp(-0.4214 * math.log(num_params) - 0.5535)


def tokens_per_tile(image_size: int, patch_size: int) -> int:
  """MM1.5's 144 (12 x 12) connector tokens per tile, or the whole patch grid if smaller."""
  return min(12, image_size // patch_size) ** 2


def model_config(size: str, vit: str, image_size: int, vocab_size: int) -> ml_collections.ConfigDict:
  llm = {key: value for key, value in LLM_SIZES[size].items() if key != "nominal_params"}  # the shape
  llm.setdefault("head_dim", llm["d_model"] // llm["n_heads"])
  llm.update(vocab_size=vocab_size, rope_theta=500_000.0, tie_embeddings=False, norm_eps=1e-5,
             qkv_bias=False,  # biases on the q/k/v projections (Qwen2-style decoders)
             # kind (modes.RopeScaling): "none" | "linear" (factor) | "llama3" (factor, low/high_freq_factor,
             # original_max_position)
             rope_scaling=dict(kind="none", factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position=8192))
  vit_cfg = dict(VIT_SIZES[vit], image_size=image_size, norm_eps=1e-5, **VIT_LAYOUT["clip"])
  return ml_collections.ConfigDict(dict(
      llm=llm,
      vit=vit_cfg,
      connector=dict(
          kind="c_abstractor",  # modes.ConnectorKind: "c_abstractor" | "mlp"
          tokens_per_tile=tokens_per_tile(image_size, vit_cfg["patch_size"]),  # a square: pooled to sqrt x sqrt
          depth=3,  # ResNet bottleneck blocks before and after pooling
          hidden_dim=vit_cfg["width"],
      ),
      # Mixture of experts (models/moe.py): num_experts=0 is a dense model. Every
      # `interval`-th decoder layer is MoE; the Switch balancing and router z losses are
      # added to the training loss with these weights (docs/recipe.md, "Mixture of experts"), each averaged over the
      # MoE layers (not summed), so a weight means the same at any depth. expert_mlp_dim=0:
      # the dense mlp_dim, which init.upcycle_from needs. impl: modes.MoeImpl ("auto": the
      # megablox kernel on TPU, tokamax's on GPU, ragged_dot on CPU).
      moe=dict(num_experts=0, top_k=2, interval=2, expert_mlp_dim=0, impl="auto", capacity_factor=1.25,
               lb_loss_weight=0.01, z_loss_weight=0.001),
      dtype="bfloat16",  # compute dtype
      param_dtype="float32",  # master weights
      # modes.Remat: "none" | "full" | "dots" (save matmul outputs) | "qkv" (save the decoder's
      # q/k/v projections) | "proj" (and the attention output and MLP input) | "proj_offload"
      # (what "proj" saves, held in host memory until the backward pass)
      remat="full",
      # Layers per scan iteration: 0 (auto) unrolls every layer on CPU (up to 16), where XLA's
      # layer loop costs ~10% of the step, and one layer per iteration elsewhere; >1 costs compile time.
      scan_unroll=0,
      attention_impl="xla",  # modes.AttentionImpl: "xla" | "cudnn" | "splash"
  ))


# Logical axis -> mesh axes. The first mesh axis not already used by another
# dimension of the same array wins, so one name serves params and activations.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
)

STAGES = ("pretrain", "cpt", "sft")

# Built-in mixture weights (data_pipelines/builtin MIXTURES["sft"]), typed here so a config
# file reads without importing the data code.
BUILTIN_SFT = {"text_rich": 0.34, "refer": 0.12, "ground": 0.12, "qa": 0.12, "counting": 0.10,
               "multi_image": 0.10, "text_chat": 0.10}

# The paper's mixtures over ArrayRecord files under config.data.root (prepare them with
# `python -m data_pipelines.convert`). SFT: w_single 0.8 split by the spec's category mix
# (text-rich 37.2, refer&ground 22.5, general 11.3, math 5.6, code 2.3, science 1.1 of the
# whole), w_multi 0.1, w_text 0.1.
PAPER_MIXTURES = {
    "pretrain": {"captions": 0.5, "interleaved": 0.1, "text": 0.4},
    "cpt": {"ocr": 1.0},
    "sft": {"text_rich": 0.372, "refer_ground": 0.225, "general": 0.113, "math": 0.056, "code": 0.023,
            "science": 0.011, "multi_image": 0.1, "text": 0.1},
}


def paper_sources(stage: str, root: str = "data/mm15") -> dict:
  return {name: dict(kind="array_record", weight=w, paths=f"{root}/{stage}/{name}-*.array_record",
                     eval_paths=f"{root}/{stage}/{name}_eval-*.array_record")
          for name, w in PAPER_MIXTURES[stage].items()}


# Per stage: tile size, tiles per row, AnyRes, steps, batch, learning rate (None: the size
# rule), the stage whose checkpoint it starts from.
# max_tiles (data.max_tiles, tiles per 4096-token row; a tile is 144 tokens plus its "index"
# indicator, "Image k:" 3-6 tokens, "Image k row i col j:" up to ~13):
#   pretrain: MM1's 16 images per sequence, unsplit: 16 x (144 + 6) = 2400 tokens, 1696 left.
#   cpt/sft: the largest split sample, 2 images x (9 + overview) = 20 tiles = 2880 + ~260
#     indicator tokens; unsplit samples (3+ images, one tile each) fit 27 in the row:
#     27 x (144 + ~6) ~ 4050 tokens, while 28 x 144 = 4032 leaves no room for 28 indicators
#     and the chat text. So 27: every sample that fits the row's tokens fits its tiles.
STAGE_SETTINGS = {
    # Pretraining: 378 px tiles, up to 16 images per sequence, no splitting.
    "pretrain": dict(image_size=378, max_tiles=16, anyres=False, steps=200_000, batch=512, lr=None, start=""),
    # High-resolution OCR continual pretraining: 672 px tiles, AnyRes (4, 9) + overview.
    "cpt": dict(image_size=672, max_tiles=27, anyres=True, steps=30_000, batch=256, lr=1e-5, start="pretrain"),
    "sft": dict(image_size=672, max_tiles=27, anyres=True, steps=23_000, batch=256, lr=2e-5, start="cpt"),
}


def size_and_stage(arg, default_size: str = "3b", default_stage: str = "sft") -> tuple[str, str]:
  """An experiment argument like "3b", "sft", "1b,sft" or "tiny" -> (size, stage)."""
  size, stage = default_size, default_stage
  for token in filter(None, (arg or "").split(",")):
    if token in STAGES:
      stage = token
    elif token in LLM_SIZES:
      size = token
    else:
      raise ValueError(f"experiment arg {token!r}: expected a size {sorted(LLM_SIZES)}, and/or a stage {STAGES}")
  return size, stage


def mm15_moe(size: str = "3b", stage: str = "pretrain") -> ml_collections.ConfigDict:
  """The MoE variant of a paper size: the dense recipe with sparse MLPs (encoder unchanged)."""
  if size not in MOE_SIZES:
    raise ValueError(f"size={size!r}: MoE sizes are {sorted(MOE_SIZES)}")
  c = mm15(size, stage)
  c.model.moe.update(MOE_SIZES[size])
  c.mesh = dict(data=1, fsdp=-1, tensor=1, expert=8)
  return c


def mm15(size: str = "3b", stage: str = "pretrain") -> ml_collections.ConfigDict:
  """The full MM1.5 recipe for one paper size and one training stage."""
  if size not in NOMINAL_PARAMS:
    raise ValueError(f"size={size!r}: expected one of {sorted(NOMINAL_PARAMS)}")
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r}: expected one of {STAGES} (e.g. experiments/mm15_3b.py:sft)")
  c = base()
  c.stage = stage
  st = STAGE_SETTINGS[stage]
  c.model = model_config(size, "H/14", image_size=st["image_size"], vocab_size=32768)
  c.data.sources = paper_sources(stage)
  c.data.seq_len = 4096
  c.data.max_tiles = st["max_tiles"]
  c.data.anyres = dict(enabled=st["anyres"], n_min=4, n_max=9, split_max_images=2, indicators="index")
  c.train.steps = st["steps"]
  c.train.batch_size = st["batch"]
  c.train.lr = st["lr"] or peak_learning_rate(NOMINAL_PARAMS[size])
  c.init.from_checkpoint = f"checkpoints/mm15_{size}_{st['start']}" if st["start"] else ""
  # MM1's decoupled weight decay is 0.1 * eta; optax's AdamW multiplies its coefficient by
  # the scheduled learning rate, so the coefficient itself is 0.1.
  c.train.weight_decay = 0.1
  c.train.warmup_steps = 2000 if stage == "pretrain" else 500
  c.mesh = dict(data=1, fsdp=-1, tensor=1, expert=1)
  # Whole logits for the pod recipes: on v5p the fused loss leaves a paper size's memory as it is
  # (the peak is in the layers) and XLA's cost model does not favour it (benchmarks/RESULTS.md,
  # "Pod plans"); it pays on CPU and where the logits dominate (a 150k vocabulary).
  c.train.loss_chunk = 0
  return c


def base() -> ml_collections.ConfigDict:
  """Every field an experiment can set, with CPU-friendly defaults: the one place a default is
  written. The code reads fields directly (a missing one is an error); a run's config.json from an
  earlier version is completed from here when loaded (run_record.fill_missing_fields). Fields that
  name a mode hold plain strings; mm15_jax/modes.py has each one's enum (its allowed values)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = "pretrain"
  c.model = model_config("tiny", "tiny", image_size=32, vocab_size=512)
  # Mesh axis sizes; -1 means "all remaining devices". With several slices (TPU multi-slice,
  # GPU hosts over the data-centre network) `mesh` is the layout within one slice and
  # `mesh_dcn` how many slices each axis spans (only data/fsdp-style axes should cross slices).
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1)
  c.mesh_dcn = dict(data=1, fsdp=1, tensor=1, expert=1)
  # Per-hardware overrides: (regex searched in the device kind, e.g. "TPU v5" for v5p, "NVIDIA
  # H100 80GB HBM3", or in $TPU_ACCELERATOR_TYPE; anchor TPU patterns, {dotted field: value}),
  # first match wins, so one experiment file serves v5p, v6e and H100 clusters.
  c.hardware_rules = ()
  # The TPU topology this experiment is planned for (`python -m mm15_jax.plan` shows it fits).
  c.topology = ""
  c.sharding_rules = DEFAULT_RULES
  # The built-in SFT-like mixture (data_pipelines/builtin): single-image 0.8, multi 0.1, text 0.1.
  c.data = dict(
      sources={name: dict(kind="builtin", weight=w) for name, w in BUILTIN_SFT.items()},
      seq_len=256,
      max_tiles=16,  # image tiles per packed row (overview + sub-images of all its images)
      # AnyRes: n_min..n_max sub-images + overview per image when a sample has <= split_max_images
      # images; indicators (modes.Indicators) "index" | "seps" | "none" name the tiles in the text.
      anyres=dict(enabled=True, n_min=1, n_max=4, split_max_images=2, indicators="index"),
      overlong="drop",  # modes.Overlong: "drop" | "truncate" (never inside an image)
      pack_bins=8,  # rows filled at once by the packer
      num_examples=100_000,  # records per built-in source
      eval_examples=512,
      image_scale=1.0,  # built-in images are 24..96 px times this
      num_workers=0,  # grain worker processes for decoding and tiling (0: in the main process)
      # Threads reading records ahead of the packer. -1 (auto): none when every source is
      # built-in (drawn in Python: threads only fight the step for the GIL), else grain's 16
      # (they hide storage latency, e.g. ArrayRecord files in a bucket).
      read_threads=-1,
      prefetch=2,  # batches put on devices ahead of the step
      # "" = the built-in tokenizer; else a SentencePiece .model file or a Hugging Face tokenizer.json
      # (an imported LLM's, with <image> added); "none" = token ids only (inference).
      tokenizer="",
  )
  c.train = dict(
      steps=200,
      batch_size=8,  # global, in sequences
      grad_accum=1,  # micro-batches per step
      lr=3e-3,
      warmup_steps=20,
      lr_min_ratio=0.1,  # cosine decays to lr * lr_min_ratio
      weight_decay=0.0,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      grad_clip=1.0,
      z_loss=0.0,
      # > 0: the LM head and cross-entropy run this many positions at a time (at most
      # data.seq_len, which it must then divide) with a fused backward (train/loss.py): the
      # [batch, length, vocab] float32 logits never exist, and on CPU the step is ~1.4x faster
      # (benchmarks/RESULTS.md). 0: whole logits, differentiated by XLA.
      loss_chunk=512,
      trainable="all",  # "all" | comma list of modes.Component: vit,connector,llm
      # modes.Objective: "next_token" (the model on the data's token rows) or "object_boxes" (a
      # stage that pretrains the image encoder alone on labelled built-in tiles; docs/recipe.md).
      objective="next_token",
      nan_policy="stop",  # modes.NanPolicy: "stop" | "skip"
      peak_tflops_per_device=0.0,  # 0 = measure/guess from the device kind
  )
  # sigterm_grace_s: after a SIGTERM the run saves at its next step boundary; if none comes
  # within this many seconds (a stall, a long compile, a hung input) it exits without saving, the
  # last complete checkpoint staying the resume point. Keep it below the scheduler's kill delay
  # (Slurm's --signal lead, a pod's termination grace period). A second SIGTERM/SIGINT exits at once.
  # compress: zstd on every array. Trained floats shrink by ~8% while compressing and
  # decompressing on the host halves save and restore speed (benchmarks/RESULTS.md, "Checkpoint
  # save and restore"), so it is off; either kind of checkpoint restores under either setting.
  c.checkpoint = dict(every=100, keep=3, async_save=True, sigterm_grace_s=120, compress=False)
  # from_checkpoint: all params of a previous stage's run (a workdir or a step dir);
  # llm_from / vit_from: only the decoder / the image encoder, from any checkpoint that has
  # them (`python -m mm15_jax.convert import` output or a run); connector_from: the connector
  # likewise (e.g. an object_boxes encoder stage's, which holds vit and connector). The rest starts fresh.
  # upcycle_from: an MoE run from a dense run's checkpoint (this config with moe.num_experts=0):
  # each expert a copy of its layer's FFN, routers fresh (mm15_jax/train/upcycle.py).
  c.init = dict(from_checkpoint="", llm_from="", vit_from="", connector_from="", upcycle_from="")
  # every=0: evaluate only at the end. generate_per_task > 0: after training, answer that many
  # held-out questions per built-in task by generation (accuracy per task, a grounding PNG).
  # best_metric (e.g. "loss", "qa/loss", or with generation "task_accuracy", "task/ground";
  # "" = off) keeps the best in-training eval's checkpoint under WORKDIR/best, lower is better
  # unless best_mode="max" (modes.BestMode).
  c.eval = dict(every=0, batches=4, generate_per_task=0, best_metric="", best_mode="min")
  # Trace step indices [start, end) (0-based: the step logged as N is index N-1) with jax.profiler
  # into WORKDIR/profile (TensorBoard/XProf);
  # () = off. all_processes=False traces process 0 only.
  c.profile = dict(steps=(), all_processes=False)
  c.log_every = 10
  # Trackers (mm15_jax/train/trackers.py): TensorBoard in WORKDIR/tensorboard; Weights & Biases
  # when wandb.project is set (the `wandb` extra), mode "online" or "offline" (modes.WandbMode).
  c.log = dict(tensorboard=True, wandb=dict(project="", entity="", name="", mode="online", dir=""))
  return c


def experiment_module(path: str):
  """The experiment file at `path`, executed as a module (get_config, and get_sweep / STAGES if any)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"experiment file {path!r} not found")
  module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def set_field(config, dotted: str, value) -> None:
  """config["train.steps"] = value, as --config.train.steps=VALUE does (ConfigDict reads dotted
  keys but does not write them)."""
  *parents, leaf = dotted.split(".")
  node = config
  for key in parents:
    node = node[key]
  node[leaf] = value


def load_experiment(spec: str) -> ml_collections.ConfigDict:
  """`FILE` or `FILE:arg` -> the ConfigDict it returns, as `--config=` would load it."""
  path, _, arg = spec.partition(":")
  module = experiment_module(path)
  return module.get_config(arg) if arg else module.get_config()
