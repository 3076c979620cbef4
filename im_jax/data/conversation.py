"""The canonical form every data source is read into, and the data error type."""

import dataclasses

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
  """Bad input data. The message always names the file, the line/record and the reason."""

  def __init__(self, source: str, record: str | int | None, reason: str):
    self.source = source
    self.record = record
    self.reason = reason
    where = source if record is None else f"{source}:{record}"
    super().__init__(f"{where}: {reason}")


@dataclasses.dataclass(frozen=True)
class Message:
  role: str  # one of ROLES
  content: str


@dataclasses.dataclass(frozen=True)
class Conversation:
  """Ordered messages plus where they came from (for error messages and stable ids)."""

  messages: tuple[Message, ...]
  source: str = ""  # file path (or tfds name) the record was read from
  record: int = 0  # 1-based line number for line formats, 0-based index otherwise
  id: str | None = None  # the record's own id, when it has one

  @property
  def where(self) -> str:
    return f"{self.source}:{self.record}"
