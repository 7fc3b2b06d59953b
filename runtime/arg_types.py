"""Argument types for the command line: each refuses what the engine cannot use, so argparse names the
flag in its one-line error before any model is read."""

from __future__ import annotations

import argparse
import math
import os
import re


def parse_bytes(text: str) -> int:
    """'139GiB', '141GB', '80G', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 139GiB or 141GB, got {text!r}")
    number, unit, binary = match.groups()
    power = " KMGT".index(unit.upper() or " ")
    base = 1024 if binary or not unit else 1000
    return int(float(number) * base**power) if unit else int(float(number))


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def port(text: str) -> int:
    value = int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535 (0: any free one), got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def float_list(text: str) -> list[float]:
    try:
        values = [finite_float(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def amb_values(text: str) -> float | list[float]:
    try:
        values = [finite_float(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected MiB values separated by commas, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"attention max batch is MiB >= 0 (0: unlimited), got {text!r}")
    return values[0] if len(values) == 1 else values


def utf8_text(text: str) -> str:
    # Python decodes argv with surrogateescape: bytes that are not UTF-8 arrive as lone surrogates.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(
            f"not UTF-8 text (byte 0x{ord(text[e.start]) & 0xFF:02x} at position {e.start})"
        ) from None
    return text


def existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path}: no such file")
    return path


def output_file(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{path}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file name")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{path}: not writable")
    return path
