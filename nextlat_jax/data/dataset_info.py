"""What every data source module shares with the pipeline: `DatasetInfo`, the split names, and the
`need` check (a ValueError naming the key and the value). A leaf module: sources import it, and the
pipeline imports the sources, without an import cycle."""
from __future__ import annotations

import dataclasses

SPLITS = ('train', 'eval')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset that the model and trainer need."""

  vocab_size: int
  eos_id: int
  pad_id: int
  row_len: int
  extra_fields: tuple[str, ...] = ()  # row fields beyond the batch contract, e.g. ('labels',) for A5


def need(ok: bool, key: str, value, why: str) -> None:
  """Raises ValueError('key=value: why') unless ok."""
  if not ok:
    raise ValueError(f'{key}={value!r}: {why}')
