"""Installs the mm15_jax library and its data_pipelines package."""

import setuptools

setuptools.setup(
    name="mm15_jax",
    version="0.1.0",
    description="JAX-native pretraining and fine-tuning of MM1.5-style multimodal LLMs.",
    packages=setuptools.find_packages(include=["mm15_jax", "mm15_jax.*", "data_pipelines", "data_pipelines.*"]),
    license="Apache-2.0",
    python_requires=">=3.11",
    install_requires=[
        # Minimums that resolve on Python 3.11 (jax 0.10 / flax 0.12.8); 3.12 gets newer releases.
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.12",
        "array-record>=0.8",  # ArrayRecord shards (data_pipelines.sources, convert)
        "etils[epath]>=1.7",  # paths that may be buckets (data_pipelines.storage)
        "ml-collections>=1.1.0",
        "sentencepiece>=0.2.0",
        "tokenizers>=0.19",  # Hugging Face tokenizer.json files (data_pipelines.tokenizer_json)
        "numpy>=1.26",
        "ml-dtypes>=0.5",  # bfloat16 tensors in public checkpoints (mm15_jax.convert)
        "msgpack>=1.0",  # record encoding (data_pipelines.records)
        "pillow>=10.0",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "absl-py>=2.1",
        "safetensors>=0.4",  # public checkpoints (mm15_jax.convert)
    ],
    extras_require={
        # Accelerators: jax's own extras, which pin the libtpu / CUDA plugin matching jaxlib.
        "tpu": ["jax[tpu]"],
        # tokamax: the dropless MoE's grouped matmul on GPU (models/grouped_matmul.py).
        "gpu": ["jax[cuda12]", "tokamax>=0.0.12"],
        # Data sources beyond JSONL, ArrayRecord and WebDataset.
        "parquet": ["pyarrow>=16.0"],  # kind="parquet" (data_pipelines.sources.parquet)
        "tfds": ["tensorflow-datasets>=4.9.9"],  # kind="tfds"
        # gs:// paths: gcsfs for etils.epath (orbax's paths, data, metrics), google-cloud-storage
        # for TensorBoard's event files. Checkpoint arrays use tensorstore's own GCS driver.
        "gcp": ["gcsfs>=2024.6.0", "google-cloud-storage>=2.14"],
        "wandb": ["wandb>=0.19"],  # config.log.wandb (mm15_jax/train/trackers.py)
        # torch/transformers: the public implementation the import parity tests compare with
        # (CPU wheel; on Python >= 3.12 those tests are skipped rather than pulling a CUDA build).
        # libtpu (unpinned): ahead-of-time compiles for TPU topologies (mm15_jax.plan) on a CPU host.
        # gcp-storage-emulator: the tests' GCS (tests/gcs_emulator.py). tokamax: the MoE's GPU path
        # (its XLA implementation on CPU).
        "test": ["pytest>=8.0", "libtpu", "tokamax>=0.0.12", "torch==2.13.0; python_version < '3.12'",
                 "transformers>=4.45; python_version < '3.12'", "gcsfs>=2024.6.0", "google-cloud-storage>=2.14",
                 "gcp-storage-emulator>=2024.8.3", "pyarrow>=16.0", "tensorflow-datasets>=4.9.9", "wandb>=0.19"],
    },
    entry_points={
        "console_scripts": [
            "mm15-train=mm15_jax.train.main:run",
            "mm15-recipe=mm15_jax.tools.recipe:run",
            "mm15-generate=mm15_jax.tools.generate:run",
            "mm15-video=mm15_jax.tools.video:run",
            "mm15-eval=mm15_jax.evaluation.main:run",
            "mm15-convert=mm15_jax.convert.main:run",
            "mm15-convert-data=mm15_jax.cli:convert_data",
            "mm15-inspect=mm15_jax.cli:inspect_data",
            "mm15-sweep=mm15_jax.tools.sweep:run",
            "mm15-plan=mm15_jax.plan.main:run",
            "mm15-summary=mm15_jax.tools.summary:run",
        ],
    },
)
