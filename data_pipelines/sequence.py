"""Records -> examples: the chat template, loss masks and the image blocks of a sequence.

An Example (one record, unpacked; packing.py packs several into a batch row) is a dict:

  tokens       int32   [n]            ids, n <= data.seq_len
  loss_on      float32 [n]            1 where tokens[i] is a trained target (predicted from
                                      tokens[i-1]); loss_on[0] = 0
  image_slots  int32   [tiles*K]      positions of the <image> tokens in tokens, tile-major
  tiles        uint8   [tiles, S, S, 3]  the AnyRes tiles of all images, in order
  kind_id      int32   scalar         records.KINDS index
  skipped      int32   scalar         MALFORMED: a placeholder for a corrupt/malformed record,
                                      TOO_LONG: for one dropped as too long; no tokens, no
                                      tiles; counted by packing
  drop_reason  int32   scalar         a placeholder's reason in detail: index in DROP_REASONS
                                      + 1 (0 for an example); packing counts each reason

Token layout (each quoted span is encoded on its own; sentencepiece starts every span at a
word boundary, so spans decode separated by a space, as they do through a byte-level BPE's
`encode_span`; <bos> is left out for a tokenizer without one, bos_id None, e.g. Qwen2's). Conversations
(user/assistant turns, any number, loss on every assistant turn's text and the <eos> that
closes it):

  <bos> "User:" {content} "Assistant:" {answer} <eos> "User:" {content} "Assistant:" ...

Documents (caption, interleaved, text: "text" messages, loss on all text and the <eos>):

  <bos> {text} {text} ... <eos>

Each IMAGE_MARKER in a content is replaced by the image's block: per tile, the position
indicator (below) then K = model.connector.tokens_per_tile <image> ids (inserted as ids,
never parsed out of text); tiles are sub-images row-major, then the overview. No loss is on
a block. Indicators (data.anyres.indicators), for image k (from 1) of grid rows x cols:
  "index": a text span before each tile: "Image k row i col j:" (i, j from 1) for a
           sub-image, "Image k overview:" for the overview, "Image k:" for an unsplit image;
  "seps":  single tokens "," after each sub-image but the last of its row, "\\n" after each
           row, ":" before the overview (an unsplit image has none);
  "none":  nothing.
So `User:<image>... Assistant: red` is a one-image single-turn conversation with "none".

Overlong (more than data.seq_len tokens or data.max_tiles tiles): data.overlong="drop"
drops it; "truncate" keeps the longest prefix that fits and never
cuts an image block: the cut moves back to the start of the first block that does not fit
(in tokens or tiles), and that image and all later ones are dropped with their tiles. An
example left with nothing to train on is dropped. A dropped record's reason is
too_many_tiles when its images need more than data.max_tiles tiles (whatever its length),
else too_many_tokens. `ExampleBuilder.build` returns a placeholder with the reason for every
dropped record; calling the builder returns None for overlong ones instead.

Drop reasons (Example["drop_reason"] = index in DROP_REASONS + 1):
  malformed        bad structure or fields (records.MalformedRecord, markers vs images, roles)
  too_many_tokens  longer than data.seq_len
  too_many_tiles   more tiles than data.max_tiles
  corrupt_image    an image that cannot be read or decoded (records.CorruptImage)
  url_image        an image given as a URL (nothing is downloaded)
"""

import numpy as np

from data_pipelines import anyres as anyres_lib
from data_pipelines import coordinates, records
from mm15_jax.modes import Indicators, Overlong, parse

USER = "User:"
ASSISTANT = "Assistant:"


def index_text(k: int, layout, t: int) -> str:
  """The "index" indicator of tile t (from 0) of image k (from 1)."""
  if not layout.split:
    return f"Image {k}:"
  rows, cols = layout.grid
  if t == rows * cols:
    return f"Image {k} overview:"
  return f"Image {k} row {t // cols + 1} col {t % cols + 1}:"


def _piece_ids(tokenizer, piece: str, text: str) -> list[int]:
  """One id for a vocabulary piece (SentencePiece byte pieces like "<0x0A>" included), else the
  encoding of its text (a byte-level BPE spells a newline "Ċ", never "<0x0A>")."""
  i = tokenizer.piece_to_id(piece)
  return [i] if i is not None else tokenizer.encode(text)


# Example["drop_reason"] of a placeholder: why its record has no example (0: a real example).
DROP_REASONS = ("malformed", "too_many_tokens", "too_many_tiles", "corrupt_image", "url_image")
MALFORMED, TOO_MANY_TOKENS, TOO_MANY_TILES, CORRUPT_IMAGE, URL_IMAGE = range(1, len(DROP_REASONS) + 1)
OVERLONG_CODES = (TOO_MANY_TOKENS, TOO_MANY_TILES)  # the rest are skips (corrupt or malformed)
# Example["skipped"]: the two totals the metrics always had (skipped_records, overlong_records).
TOO_LONG = 2  # with MALFORMED = 1


def coarse(reason: int) -> int:
  """Example["skipped"] of a drop reason: TOO_LONG for overlong ones, MALFORMED for the rest, 0 for none."""
  return 0 if not reason else TOO_LONG if reason in OVERLONG_CODES else MALFORMED


def skip_code(reason: str | None) -> int:
  """The drop code of a record that failed to decode, from records.decode_or_skip's reason
  ("CorruptImage: ..." / "MalformedRecord: ..."; None: unknown, counted as malformed)."""
  if reason and reason.startswith("CorruptImage"):
    return URL_IMAGE if "is a URL" in reason else CORRUPT_IMAGE  # corpus_formats' URL message
  return MALFORMED


def placeholder(tile: int, reason: int, kind_id: int = -1) -> dict:
  """An Example with no tokens and no tiles that stands for a record packing counts, not packs.
  reason: a drop reason code (MALFORMED, TOO_MANY_TOKENS, ...)."""
  return dict(tokens=np.zeros(0, np.int32), loss_on=np.zeros(0, np.float32), image_slots=np.zeros(0, np.int32),
              tiles=np.zeros((0, tile, tile, 3), np.uint8), kind_id=np.int32(kind_id),
              skipped=np.int32(coarse(reason)), drop_reason=np.int32(reason))


class ExampleBuilder:
  """Callable for grain `map`: record (records.py schema, images decoded) -> Example | None."""

  def __init__(self, tokenizer, *, seq_len: int, tile: int, tokens_per_tile: int, anyres=None,
               indicators: str = Indicators.NONE, overlong: str = Overlong.DROP, max_tiles: int | None = None):
    indicators, overlong = parse(Indicators, indicators), parse(Overlong, overlong)
    self.tokenizer = tokenizer
    self.seq_len, self.tile, self.k = seq_len, tile, tokens_per_tile
    self.anyres = anyres if anyres is not None else dict(enabled=False)
    self.indicators, self.overlong = indicators, overlong
    self.max_tiles = max_tiles if max_tiles is not None else np.iinfo(np.int32).max
    self._user, self._assistant = tokenizer.encode_span(USER), tokenizer.encode_span(ASSISTANT)
    self._seps = {s: _piece_ids(tokenizer, p, s) for s, p in ((",", ","), ("\n", "<0x0A>"), (":", ":"))}

  @classmethod
  def from_config(cls, config, tokenizer) -> "ExampleBuilder":
    anyres = config.data.anyres
    return cls(tokenizer, seq_len=config.data.seq_len, tile=config.model.vit.image_size,
               tokens_per_tile=config.model.connector.tokens_per_tile, anyres=anyres,
               indicators=anyres.indicators, overlong=config.data.overlong, max_tiles=config.data.max_tiles)

  def skipped(self, kind_id: int = -1, reason: int = MALFORMED) -> dict:
    """The placeholder Example of a dropped record (packing counts and drops it)."""
    return placeholder(self.tile, reason, kind_id)

  def _block(self, k: int, layout) -> tuple[list[int], list[int]]:
    """(ids, slot offsets within ids) of image k's block."""
    ids, slots = [], []
    rows, cols = layout.grid
    for t in range(layout.num_tiles):
      if self.indicators == Indicators.INDEX:
        ids += self.tokenizer.encode_span(index_text(k, layout, t))
      elif self.indicators == Indicators.SEPS and layout.split and t == rows * cols:
        ids += self._seps[":"]
      slots += range(len(ids), len(ids) + self.k)
      ids += [self.tokenizer.image_id] * self.k
      if self.indicators == Indicators.SEPS and layout.split and t < rows * cols:
        ids += self._seps["," if t % cols < cols - 1 else "\n"]
    return ids, slots

  def _layout_tokens(self, messages, layouts):
    """ids, loss (lists) and the image blocks as (start, end, slot positions)."""
    roles = {m["role"] for m in messages}
    if roles - {"text"} and "text" in roles:
      raise records.MalformedRecord(f"messages mix 'text' with chat roles {sorted(roles)}")
    chat = "text" not in roles
    bos = self.tokenizer.bos_id  # None: a tokenizer without one (Qwen2); the first span starts the sequence
    ids, loss, blocks = ([bos], [0.0], []) if bos is not None else ([], [], [])

    def add(new, on):
      ids.extend(new)
      loss.extend([float(on)] * len(new))

    for m in messages:
      trained = m["role"] != "user"  # assistant turns; every text message of a document
      if m["role"] != "text":
        add(self._user if m["role"] == "user" else self._assistant, False)
      for i, span in enumerate(m["content"].split(records.IMAGE_MARKER)):
        if i:  # a marker preceded this span
          k = len(blocks)
          if k >= len(layouts):
            raise records.MalformedRecord(f"more {records.IMAGE_MARKER!r} markers than images ({len(layouts)})")
          block, slots = self._block(k + 1, layouts[k])
          blocks.append((len(ids), len(ids) + len(block), [len(ids) + s for s in slots]))
          add(block, False)
        add(self.tokenizer.encode_span(span), trained)
      if m["role"] == "assistant":
        add([self.tokenizer.eos_id], True)
    if not chat:
      add([self.tokenizer.eos_id], True)
    if len(blocks) != len(layouts):
      raise records.MalformedRecord(f"{len(blocks)} {records.IMAGE_MARKER!r} markers but {len(layouts)} images")
    if loss:
      loss[0] = 0.0  # nothing predicts the first token (a text token without <bos>)
    return ids, loss, blocks

  def prompt(self, record: dict) -> dict:
    """Inference input: a conversation record whose last turn is the user's, laid out exactly as
    training lays out the same turns, then the "Assistant:" prefix the answer follows.

    Returns dict(tokens int32 [n], image_slots int32 [tiles*K], tiles uint8 [tiles, S, S, 3],
    layouts: the images' anyres.Layout). Coordinates are remapped as in training (coords
    "image", one image). Never truncated: more tiles than max_tiles raise ValueError.
    """
    messages = record["messages"]
    if not messages or messages[-1]["role"] != "user":
      raise ValueError("a prompt is a conversation whose last message is the user's; got roles "
                       f"{[m['role'] for m in messages]}")
    images = record.get("images", [])
    layouts = anyres_lib.plan_images([im.shape[:2] for im in images], tile=self.tile, anyres=self.anyres)
    if record.get("coords") == "image" and len(images) == 1:
      messages = [dict(m, content=coordinates.remap_text(m["content"], layouts[0])) for m in messages]
    ids, _, blocks = self._layout_tokens(messages, layouts)
    tiles = sum(layout.num_tiles for layout in layouts)
    if tiles > self.max_tiles:
      raise ValueError(f"the prompt's {len(images)} image(s) make {tiles} tiles but data.max_tiles={self.max_tiles}; "
                       "give fewer or smaller images, or raise --config.data.max_tiles")
    t = self.tile
    tiles_u8 = [anyres_lib.render_tiles(image, layout) for image, layout in zip(images, layouts)]
    return dict(tokens=np.asarray(ids + self._assistant, np.int32),
                image_slots=np.asarray([p for _, _, slots in blocks for p in slots], np.int32).reshape(-1),
                tiles=np.concatenate(tiles_u8) if tiles_u8 else np.zeros((0, t, t, 3), np.uint8),
                layouts=layouts)

  def __call__(self, record: dict | None) -> dict | None:
    """`build`, but None for a record dropped as overlong (too many tokens or tiles)."""
    example = self.build(record)
    return None if int(example["drop_reason"]) in OVERLONG_CODES else example

  def build(self, record: dict | None) -> dict:
    """A record, or {"skipped": 1, "reason": ...} for one that failed to decode -> Example, or
    the placeholder of a dropped record with its reason (module docstring). grain's map passes
    None elements through without calling this, so a failure must arrive as such a dict to be
    counted."""
    if record is None or record.get("skipped"):
      return self.skipped(reason=skip_code(None if record is None else record.get("reason")))
    kind_id = records.KINDS.index(record["kind"]) if record.get("kind") in records.KINDS else -1
    try:
      images = record.get("images", [])
      layouts = anyres_lib.plan_images([im.shape[:2] for im in images], tile=self.tile, anyres=self.anyres)
      messages = record["messages"]
      if record.get("coords") == "image" and len(images) == 1:
        messages = [dict(m, content=coordinates.remap_text(m["content"], layouts[0])) for m in messages]
      ids, loss, blocks = self._layout_tokens(messages, layouts)
    except (records.MalformedRecord, KeyError, ValueError):
      return self.skipped(kind_id)  # packing counts it; records.decode names the field upstream

    # Overlong: keep the longest prefix in budget, never cutting a block (module docstring).
    cut, kept, tiles = len(ids), len(blocks), 0
    for i, (start, end, _) in enumerate(blocks):
      tiles += layouts[i].num_tiles
      if end > self.seq_len or tiles > self.max_tiles:
        cut, kept = start, i
        break
    cut = min(cut, self.seq_len)
    if cut < len(ids) or kept < len(blocks):
      all_tiles = sum(layout.num_tiles for layout in layouts)
      reason = TOO_MANY_TILES if all_tiles > self.max_tiles else TOO_MANY_TOKENS
      if self.overlong == Overlong.DROP:
        return self.skipped(kind_id, reason)
      ids, loss = ids[:cut], loss[:cut]
      if not any(loss):
        return self.skipped(kind_id, reason)

    slots = [p for _, _, block_slots in blocks[:kept] for p in block_slots]
    t = self.tile
    tiles_u8 = [anyres_lib.render_tiles(images[i], layouts[i]) for i in range(kept)]
    return dict(tokens=np.asarray(ids, np.int32), loss_on=np.asarray(loss, np.float32),
                image_slots=np.asarray(slots, np.int32).reshape(-1),
                tiles=np.concatenate(tiles_u8) if tiles_u8 else np.zeros((0, t, t, 3), np.uint8),
                kind_id=np.int32(kind_id), skipped=np.int32(0), drop_reason=np.int32(0))
