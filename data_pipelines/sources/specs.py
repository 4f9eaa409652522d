"""Reading and checking one entry of `config.data.sources` (a source's spec), alike for every kind.

A spec is a dict or ConfigDict: the COMMON_KEYS, then the keys its kind's module declares
(KEYS, and RENAMED for old names still read). Any other key is an error naming
`config.data.sources.NAME.KEY`: a typo would otherwise leave a default in place unnoticed.
File kinds name their train files `paths` and their eval files `eval_paths`.
"""

import difflib

from absl import logging

COMMON_KEYS = ("kind", "weight")


def where(name: str) -> str:
  return f"config.data.sources.{name}"


def field(spec, key: str, default=None):
  """spec[key] or default, for a dict, a ConfigDict or an object with attributes."""
  return spec.get(key, default) if hasattr(spec, "get") else getattr(spec, key, default)


def field_map(spec, key: str = "fields") -> dict:
  """A dict-valued key (e.g. `fields`) as a plain dict; {} when absent."""
  return dict(field(spec, key, {}) or {})


def did_you_mean(wrong, choices) -> str:
  """" (did you mean 'x'?)" for the closest of choices, else ""."""
  close = difflib.get_close_matches(str(wrong), [str(c) for c in choices], n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(name: str, spec, kind: str, accepted, renamed: dict) -> None:
  """Raises for a key neither accepted nor an old name in renamed (old -> new); warns for an old name."""
  present = list(spec.keys()) if hasattr(spec, "keys") else list(vars(spec))
  for key in present:
    if key in renamed:
      new = renamed[key]
      if new in present:
        raise ValueError(f"{where(name)}: give {new} only, not both {new} and {key} (its old name)")
      logging.warning("%s.%s is deprecated: name it %s (a file, a glob, or a list of these)", where(name), key, new)
    elif key not in accepted:
      raise ValueError(f"{where(name)}.{key}: not a key of kind={kind!r}{did_you_mean(key, accepted)}; "
                       f"its keys are {sorted(accepted)}")


def paths_key(split: str) -> str:
  return "eval_paths" if split == "eval" else "paths"


def split_paths(name: str, spec, kind: str, split: str, renamed: dict | None = None):
  """The files of a split: `paths` (train) or `eval_paths` (eval), else their old name in renamed."""
  key = paths_key(split)
  old = next((old for old, new in (renamed or {}).items() if new == key), None)
  paths = field(spec, key) or (field(spec, old) if old else None)
  if not paths:
    raise ValueError(f"{where(name)}: kind={kind!r} needs {key}")
  return paths
