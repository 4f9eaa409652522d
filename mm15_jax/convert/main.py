"""Public weights in and out.

  python -m mm15_jax.convert import --kind=llm --hf=HF_DIR --out=DIR    # or --kind=vit
  python -m mm15_jax.convert check --hf=HF_DIR --checkpoint=DIR          # max relative difference
  python -m mm15_jax.convert export --checkpoint=DIR --out=HF_DIR [--config=FILE] [--dtype=bfloat16]

Several processes (launch/local.sh, a pod): `import` reads on every process only the slices its
devices hold and process 0 writes the config files; `export` gathers the decoder to every process
and process 0 writes. --out may be a bucket (gs://).

`import` reads a Llama/Mistral/Qwen2 or Mixtral (MoE) decoder or a CLIP/SigLIP vision tower saved as
safetensors (config.json beside), writes DIR/checkpoints (orbax) and DIR/config.py; start
training from it with --config.init.llm_from=DIR / --config.init.vit_from=DIR. `check`
needs torch and transformers (CPU builds).
"""

import json
import sys

from absl import app, flags

from mm15_jax import cli, distributed

COMMANDS = ("import", "export", "check")


def main(argv):
  distributed.initialize()
  from mm15_jax.convert import exporter, importer, parity

  f = flags.FLAGS
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"give one command: {' | '.join(COMMANDS)} (python -m mm15_jax.convert import --help)")
  command = argv[1]
  if command == "import":
    if not (f.hf and f.out):
      raise app.UsageError("import needs --hf=DIR (config.json + *.safetensors) and --out=DIR")
    summary = importer.run_import(f.kind, f.hf, f.out)
    if distributed.is_main():
      print(json.dumps(summary, indent=2))
  elif command == "export":
    if not (f.checkpoint and f.out):
      raise app.UsageError("export needs --checkpoint=DIR and --out=DIR")
    shards = exporter.run_export(f.checkpoint, f.out, config_spec=f.config, dtype=f.dtype)
    if distributed.is_main():
      print(f"wrote {len(shards)} shard(s) and config.json to {f.out}")
  else:
    if not (f.hf and f.checkpoint):
      raise app.UsageError("check needs --hf=DIR and --checkpoint=DIR")
    result = parity.run_check(f.hf, f.checkpoint, config_spec=f.config, image_size=f.image_size)
    print(json.dumps(result))
    print(f"largest relative difference of the {'logits' if result['kind'] == 'llm' else 'features'}: "
          f"{result['max_relative_difference']:.3e}")


def run():
  # Defined here, not at import: tests import several tools into one process.
  distributed.define_flags()
  flags.DEFINE_enum("kind", "llm", ["llm", "vit"], "import: a decoder LLM or an image encoder")
  flags.DEFINE_string("hf", None, "a public model directory: config.json + *.safetensors")
  flags.DEFINE_string("out", None, "output directory (must be new)")
  flags.DEFINE_string("checkpoint", None, "our checkpoint: an import's DIR, a run's workdir or a step directory")
  flags.DEFINE_string("config", None, "export/check: the experiment FILE[:arg] (default CHECKPOINT/config.py)")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "export: tensor dtype")
  flags.DEFINE_integer("image_size", 0, "check --kind=vit: image size (0: the encoder's own; others interpolate)")
  cli.run(main, __doc__, argv=sys.argv)


if __name__ == "__main__":
  run()
