"""kind="tfds": a tfds dataset prepared on disk, read without TensorFlow.

  TfdsSource("my_vqa", "train", "/data/tfds", fields=dict(kind="conversation", image="image",
             question="question", answer="answers"))
"""

import numpy as np

from data_pipelines import records, storage
from data_pipelines.sources import specs

# split / eval_split are tfds split names ("train", "validation[:10%]"), not files.
KEYS = ("name", "split", "eval_split", "data_dir", "fields")

# How a tfds example becomes a record (TfdsSource's `fields`):
#   kind      the record kind of every example
#   image     feature holding the image (tfds Image) or images (Sequence(Image)); "" for none
#   text      feature with the text of caption / interleaved / text documents
#   question, answer   features of a single-turn conversation (conversation / multi_image,
#             or a text-only conversation); a list-valued answer (e.g. VQA's several
#             answers) contributes its first element
#   category, coords   constants copied into every record
# Images go in front of the text as markers ("<image>" per image; followed by a newline
# before a question) unless the text already holds one marker per image.
TFDS_FIELDS = dict(kind="caption", image="image", text="", question="", answer="", category="", coords="none")


def _text(value) -> str:
  if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
    if len(value) == 0:
      raise records.MalformedRecord("text feature: empty list")
    value = value[0]
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise records.MalformedRecord(f"text feature: not UTF-8 ({e})") from e
  if not isinstance(value, str):
    raise records.MalformedRecord(f"text feature: expected str or bytes, got {type(value).__name__}")
  return value


def _with_markers(text: str, num_images: int, separator: str) -> str:
  if not num_images or text.count(records.IMAGE_MARKER):
    return text  # already placed (a wrong count is left for validation to report)
  return records.IMAGE_MARKER * num_images + separator + text


def tfds_to_record(example: dict, fields: dict) -> dict:
  """A tfds example (images still encoded bytes) -> record with byte images; see TFDS_FIELDS."""
  fields = {**TFDS_FIELDS, **fields}
  images = []
  if fields["image"]:
    value = example[fields["image"]]
    images = [value] if isinstance(value, bytes) else list(value)
    images = [bytes(image) for image in images]
  kind = fields["kind"]
  if fields["question"]:
    question = _with_markers(_text(example[fields["question"]]), len(images), "\n")
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": _text(example[fields["answer"]])}]
  else:
    text = _with_markers(_text(example[fields["text"]]), len(images), "")
    messages = [{"role": "text", "content": text}]
  return dict(kind=kind, messages=messages, images=images, category=fields["category"], coords=fields["coords"])


def _check_fields(fields: dict, features) -> None:
  unknown = sorted(set(fields) - set(TFDS_FIELDS))
  if unknown:
    raise ValueError(f"tfds fields {unknown} unknown; expected keys of {sorted(TFDS_FIELDS)}")
  merged = {**TFDS_FIELDS, **fields}
  if merged["kind"] not in records.KINDS:
    raise ValueError(f"tfds fields kind={merged['kind']!r} is not one of {records.KINDS}")
  if bool(merged["question"]) != bool(merged["answer"]) or not (merged["question"] or merged["text"]):
    raise ValueError(f"tfds fields {fields}: give `text`, or both `question` and `answer`")
  for key in ("image", "text", "question", "answer"):
    if merged[key] and merged[key] not in features:
      raise ValueError(f"tfds fields {key}={merged[key]!r} is not a feature; features: {sorted(features)}")


class TfdsSource:
  """Serialised records from a tfds dataset prepared on disk (array_record format).

  Images are read as their stored encoded bytes (no decode here, and no TensorFlow).
  Nothing is downloaded: the dataset must already be in data_dir.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None, *, fields: dict):
    self._args = (name, split, data_dir, fields)
    self.name, self.fields = f"{name}/{split}", {**TFDS_FIELDS, **fields}
    self._source = self._open()

  def _open(self):
    try:
      import tensorflow_datasets as tfds  # slow import; only tfds users pay it
    except ImportError as e:
      raise ImportError(f"kind='tfds' sources need tensorflow-datasets ({e}): pip install 'mm15_jax[tfds]'") from e

    class KeepEncoded(tfds.decode.SkipDecoding):
      def decode_batch_example_np(self, serialized):  # Sequence(Image): a list of encoded images
        return serialized

    name, split, data_dir, fields = self._args
    _check_fields(fields, tfds.builder(name, data_dir=data_dir, try_gcs=False).info.features)
    image = self.fields["image"]
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False, try_gcs=False,
                            decoders={image: KeepEncoded()} if image else None)

  # The decoder's class is local (tfds is imported lazily): pickle the arguments, reopen.
  def __getstate__(self):
    return {key: value for key, value in self.__dict__.items() if key != "_source"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._source = self._open()

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> bytes:
    try:
      return records.LocatedBytes(records.encode(tfds_to_record(self._source[index], self.fields)),
                                  f"tfds {self.name}[{index}]")
    except records.MalformedRecord as e:
      return records.encode_error(f"tfds {self.name}[{index}]: {e}")

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, {len(self)} records, fields={self.fields})"


def build(name: str, spec, config, split: str) -> TfdsSource:
  data_dir = specs.field(spec, "data_dir")
  storage.local_only(data_dir or "", f"{specs.where(name)}.data_dir")  # tfds datasets are ArrayRecord
  return TfdsSource(specs.field(spec, "name"), specs.field(spec, "eval_split" if split == "eval" else "split", "train"),
                    data_dir, fields=specs.field_map(spec))
