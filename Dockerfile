# The trainer image for TPU slices (launch/gke_jobset.yaml, launch/xpk.md):
#   docker build -t REGISTRY/mm15_jax:latest . && docker push REGISTRY/mm15_jax:latest
# The install is the README's, plus the `tpu` extra (libtpu).
FROM python:3.11-slim
WORKDIR /mm15_jax
# The source only: a local .venv or workdirs must not reach the image.
COPY setup.py README.md ./
COPY mm15_jax mm15_jax
COPY data_pipelines data_pipelines
COPY experiments experiments
COPY launch launch
RUN python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[tpu,gcp,parquet,tfds]'
ENV PATH=/mm15_jax/.venv/bin:$PATH PYTHONUNBUFFERED=1
CMD ["python", "-m", "mm15_jax.train", "--help"]
