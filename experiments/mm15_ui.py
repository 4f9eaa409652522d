"""MM1.5-UI: further SFT of an SFT model on UI screenshots: referring and grounding on
widgets of tall phone screens (the MM1.5 paper's MM1.5-UI variant).

  python -m mm15_jax.train --config=experiments/mm15_ui.py:3b --workdir=DIR \
      --config.init.from_checkpoint=SFT_WORKDIR
  python -m mm15_jax.train --config=experiments/mm15_ui.py:tiny --workdir=DIR   # CPU, built-in "ui" screens

arg: a comma list of a size (1b, 3b, 7b, 30b, or tiny; default 3b) and a stage (default sft).

Tall aspect ratios. The AnyRes grid set is every (rows, cols) with n_min <= rows*cols <= n_max,
so columns of tiles (up to n_max x 1) are already in it; what a tall screen lacks at the
SFT recipe's n_max = 9 is resolution: a 1080 x 2340 phone screen fits 4x2 tiles of 672 px at
full resolution, a 1:3 screen (1344 x 4032 at 2 tiles wide) needs 6x2 = 12. Our choice
(the paper does not give its grid set): n_max = 12, which adds 10x1, 11x1, 12x1, 6x2 and
4x3 (1872 image tokens at most, 13 tiles with the overview); n_min = 4 as in SFT.
"""

import os

from mm15_jax import configs

UI_N_MAX = 12


def get_config(arg="3b"):
  size, stage = configs.size_and_stage(arg)
  if size == "tiny":
    c = configs.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    c.stage = stage
    # Built-in phone screens (data_pipelines/builtin/ui.py, up to 1:3) beside the SFT mix,
    # so the model keeps its other skills; tall grids up to 6x1 / 3x2 of the 32 px tiles.
    c.data.sources = {"ui": dict(kind="builtin", weight=0.5),
                      **{name: dict(kind="builtin", weight=0.5 * w) for name, w in configs.BUILTIN_SFT.items()}}
    c.data.anyres.update(n_min=1, n_max=6)
    return c
  c = configs.mm15(size, stage)
  c.data.anyres.update(n_min=4, n_max=UI_N_MAX)
  # Two split screens (data.anyres.split_max_images) of up to UI_N_MAX + 1 tiles each.
  c.data.max_tiles = max(c.data.max_tiles, c.data.anyres.split_max_images * (UI_N_MAX + 1))
  if stage == "sft":
    # UI screenshots (Ferret-UI-style referring/grounding, ArrayRecord files prepared with
    # data_pipelines.convert) and some of the general SFT mix against forgetting; from
    # the SFT checkpoint. Steps and mix are our choice (unpublished).
    root = "data/mm15"
    c.data.sources = {"ui": dict(kind="array_record", weight=0.7, paths=f"{root}/ui/ui-*.array_record",
                                 eval_paths=f"{root}/ui/ui_eval-*.array_record"),
                      **{name: dict(spec, weight=0.3 * spec["weight"])
                         for name, spec in configs.paper_sources("sft", root).items()}}
    c.init.from_checkpoint = f"checkpoints/mm15_{size}_sft"
    c.train.steps = 5000
  return c
