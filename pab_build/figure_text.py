"""Text for matplotlib figures (the card's grids, CMP's top-5 figure): wrapped by its measured
width, in DejaVu Sans (ships with matplotlib), characters the font lacks shown as "?"."""

from __future__ import annotations

import functools

FONT = "DejaVu Sans"


@functools.cache
def _font_chars() -> frozenset[int]:
    from matplotlib import font_manager, ft2font

    return frozenset(ft2font.FT2Font(font_manager.findfont(FONT)).get_charmap())


def renderable(text: str) -> str:
    """``text`` with the characters the font has no glyph for replaced by "?" (a visible marker,
    not an empty box and a warning per character)."""
    chars = _font_chars()
    return "".join(c if ord(c) in chars or c == "\n" else "?" for c in text)


@functools.cache
def _width_pt(text: str, size: float) -> float:
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    width, _, _ = TextToPath().get_text_width_height_descent(text, FontProperties(family=FONT, size=size), ismath=False)
    return width


def wrap_to_width(text: str, width_in: float, size: float, max_lines: int) -> str:
    """``text`` broken into lines no wider than ``width_in`` inches at ``size`` points (a word
    wider than a line is split), at most ``max_lines`` lines, the last ending in "…" if cut."""
    limit = width_in * 72
    lines: list[str] = []
    line = ""
    for word in renderable(" ".join(text.split())).split(" "):
        candidate = f"{line} {word}" if line else word
        if _width_pt(candidate, size) <= limit:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for ch in word:  # a word too long for a line goes on over several
            if line and _width_pt(line + ch, size) > limit:
                lines.append(line)
                line = ""
            line += ch
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and _width_pt(lines[-1] + "…", size) > limit:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "…"
    return "\n".join(lines)
