"""Names from files shown as text, never rendered.

A checkpoint's name, a class folder, a run folder, an uploaded file's name or an error message that quotes one can
hold anything. Streamlit renders Markdown (with images, colours, maths and icons) in captions, messages, headers and
button labels, so such a text goes through `md()` on its way into any of them, and through `shown()` into plain
text (tables, chart labels, select boxes), which drops the invisible characters that reorder or hide text.

    st.caption(f"by {md(checkpoint.name)}")      # '![x](http://...)' is shown, never fetched
"""

from __future__ import annotations

import re
import unicodedata

# Characters that reorder or hide what follows them (bidirectional overrides and isolates, marks), and zero-width
# ones: a name holding U+202E would print the rest of a caption backwards.
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2069\u061c\ufeff]")
_ASCII_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")  # CommonMark: each may be escaped with a backslash
_AUTOLINK = re.compile(r"(?i)(https?|ftp|mailto|www|xmpp|[\w.+-](?=@))(?=[:.@])")
MAX_SHOWN = 200


def shown(name, limit: int | None = MAX_SHOWN) -> str:
    """`name` as one line of visible text: control, format and reordering characters removed, at most `limit`
    characters."""
    text = _INVISIBLE.sub("", str(name))
    text = "".join(" " if ch in "\r\n\t" else ch for ch in text
                   if unicodedata.category(ch) not in ("Cc", "Cf") or ch in "\r\n\t")
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def md(name, limit: int | None = MAX_SHOWN) -> str:
    """`name` for a Markdown context: `shown`, with every ASCII punctuation character written as a numeric
    character reference (`:` as `&#58;`), so nothing in it is formatting, a link, an image, a colour, maths, an
    icon. Bare URLs and e-mail addresses, which GitHub-flavoured Markdown links after decoding (no escape stops
    that), get an invisible word joiner after their scheme, `www` or the part before `@`."""
    text = _AUTOLINK.sub("\\1\u2060", shown(name, limit))
    return _ASCII_PUNCTUATION.sub(lambda m: f"&#{ord(m.group(1))};", text)


def md_message(message) -> str:
    """An error or status message that may quote names: its lines kept, each escaped like `md` (so a long
    traceback-free message keeps its shape)."""
    lines = [md(line, None) if line.strip() else "" for line in str(message).splitlines()] or [""]
    return "  \n".join(lines)
