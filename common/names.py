"""The one naming rule for topics and consumer groups.

Topic names become directory names and NATS subjects, so they are kept to ASCII letters, digits,
'.', '_' and '-', 1 to 128 characters, starting with a letter or digit. Group names follow the
same rule."""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "use 1-128 of A-Z a-z 0-9 . _ - (starting with a letter or digit)"


def valid_name(name: str) -> bool:
    return NAME_PATTERN.fullmatch(name) is not None


valid_topic = valid_group = valid_name
