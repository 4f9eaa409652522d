"""One example -> one row of the batch (mm15_jax/batch.py): chat template, masks, image slots.

Chat template, at the token level (each quoted span is encoded on its own; sentencepiece
starts every span at a word boundary, so spans read as separated by a space):

  <bos> "User:" <image> x (tiles * K) "{question}" "Assistant:" "{answer}" <eos>

decoded: `User:<image><image><image><image> What color is the circle? Assistant: red`.
The `<image>` ids are inserted as ids, never parsed out of user text, and each run of
K = model.connector.tokens_per_tile of them is one tile's slots for the connector output.
The loss is on the answer and the final <eos> only.
"""

import numpy as np

USER = "User:"
ASSISTANT = "Assistant:"

# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD (CLIP and DFN ViTs expect these).
CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 [..., 3] with CLIP mean/std."""
  return (image.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


class SequenceBuilder:
  """Callable for `grain.MapDataset.map`: example dict -> batch-row dict of numpy arrays.

  An example is a dict with `image` uint8 [S, S, 3] (one tile) or [tiles, S, S, 3],
  `question` and `answer` str. An example longer than seq_len is never cut (that could
  split an image's slots): it raises, or with drop_overlong=True maps to None, which
  grain drops.
  """

  def __init__(self, tokenizer, *, seq_len: int, max_tiles: int, image_size: int, tokens_per_tile: int,
               drop_overlong: bool = False):
    self.tokenizer = tokenizer
    self.seq_len, self.max_tiles, self.image_size = seq_len, max_tiles, image_size
    self.tokens_per_tile, self.drop_overlong = tokens_per_tile, drop_overlong

  @classmethod
  def from_config(cls, config, tokenizer, drop_overlong: bool = False) -> "SequenceBuilder":
    return cls(tokenizer, seq_len=config.data.seq_len, max_tiles=config.data.max_tiles,
               image_size=config.model.vit.image_size,
               tokens_per_tile=config.model.connector.tokens_per_tile, drop_overlong=drop_overlong)

  def token_ids(self, question: str, answer: str, tiles: int) -> tuple[list[int], int]:
    """(ids, prompt_len): ids[prompt_len:] are the answer and <eos>."""
    tok = self.tokenizer
    prompt = ([tok.bos_id] + tok.encode(USER) + [tok.image_id] * (tiles * self.tokens_per_tile)
              + tok.encode(question) + tok.encode(ASSISTANT))
    return prompt + tok.encode(answer) + [tok.eos_id], len(prompt)

  def __call__(self, example: dict) -> dict | None:
    tiles_u8 = example["image"]
    if tiles_u8.ndim == 3:
      tiles_u8 = tiles_u8[None]
    tiles, s = tiles_u8.shape[0], self.image_size
    if tiles_u8.shape[1:] != (s, s, 3) or tiles_u8.dtype != np.uint8:
      raise ValueError(f"example image has shape {tiles_u8.shape} {tiles_u8.dtype}, expected uint8 [tiles, {s}, {s}, 3] "
                       "(model.vit.image_size)")
    if tiles > self.max_tiles:
      raise ValueError(f"example has {tiles} image tiles but data.max_tiles={self.max_tiles}; raise data.max_tiles")

    ids, prompt_len = self.token_ids(example["question"], example["answer"], tiles)
    n, length = len(ids), self.seq_len
    if n > length:
      if self.drop_overlong:
        return None
      raise ValueError(
          f"example has {n} tokens ({tiles} tile(s) x {self.tokens_per_tile} image tokens + text) but "
          f"data.seq_len={length}; raise it, e.g. --config.data.seq_len={n}, or drop such examples "
          f"(drop_overlong=True). Question: {example['question']!r}")

    pad = self.tokenizer.pad_id
    tokens = np.full(length, pad, np.int32)
    tokens[:n] = ids
    targets = np.full(length, pad, np.int32)
    targets[:n - 1] = ids[1:]
    loss_mask = np.zeros(length, np.float32)
    loss_mask[prompt_len - 1:n - 1] = 1.0  # positions whose target is an answer token or <eos>
    segment_ids = np.zeros(length, np.int32)
    segment_ids[:n] = 1
    positions = np.zeros(length, np.int32)
    positions[:n] = np.arange(n)

    images = np.zeros((self.max_tiles, s, s, 3), np.float32)
    images[:tiles] = normalize_image(tiles_u8)
    image_token_positions = np.full(self.max_tiles * self.tokens_per_tile, -1, np.int32)
    slots = np.flatnonzero(tokens[:n] == self.tokenizer.image_id)
    if len(slots) != tiles * self.tokens_per_tile:  # "<image>" typed in the text would steal a slot
      raise ValueError(f"example has {len(slots)} image tokens, expected {tiles * self.tokens_per_tile}; "
                       f"its text contains the image placeholder: {example['question']!r} {example['answer']!r}")
    image_token_positions[:len(slots)] = slots
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids,
                positions=positions, images=images, image_token_positions=image_token_positions)
