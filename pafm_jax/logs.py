"""Logging set-up shared by the command-line entry points."""

import logging

from absl import logging as absl_logging


class _LibraryInfoFilter(logging.Filter):
  """Drops the per-file INFO chatter of Orbax and Grain; their warnings still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    noisy = ('/orbax/' in record.pathname or '/grain/' in record.pathname)
    return record.levelno >= logging.WARNING or not noisy


def quiet_library_info() -> None:
  """Keeps a CLI's log readable: our INFO lines and every library warning, not Orbax's INFO."""
  absl_logging.get_absl_handler().addFilter(_LibraryInfoFilter())
