"""Calibration and held-out text: Wikipedia articles, split deterministically.

Articles are numbered in dump order; every ``HELDOUT_EVERY``-th article is held out
for perplexity and never used for calibration, so no evaluation sees calibration text.
This is not WikiText-2: compare methods with each other and with dense on the same
text, never with published WikiText perplexities.
"""

from __future__ import annotations

import bz2
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

import torch

HELDOUT_EVERY = 5  # article i is held out when i % 5 == 4 (20% of the text)
MIN_ARTICLE_CHARS = 2000  # redirects and stubs carry no useful activations


# The cleaned articles as JSON, in the cache folder: what a machine without gensim (the
# GPU image) reads instead of the dump (benchmarks/gpu/quality_pack.sh writes it).
ARTICLES_FILE = "wiki_articles.json"


def write_articles_file(target: str | Path) -> Path:
    """Write ``wiki_articles()`` (cleaned here, with gensim) to ``target`` as JSON."""
    import hashlib
    import json

    articles = wiki_articles()
    digest = hashlib.sha256("\n\n".join(articles).encode()).hexdigest()
    target = Path(target)
    target.write_text(json.dumps({"source": "gensim filter_wiki of the gensim test-data dump",
                                  "sha256": digest, "articles": list(articles)}))
    return target


def _articles_from_file() -> tuple[str, ...] | None:
    import hashlib
    import json

    from vllm_rsparse.calibration.assets import cache_dir

    src = cache_dir() / ARTICLES_FILE
    if not src.is_file():
        return None
    saved = json.loads(src.read_text())
    articles = tuple(saved["articles"])
    if hashlib.sha256("\n\n".join(articles).encode()).hexdigest() != saved["sha256"]:
        raise RuntimeError(f"{src}: articles do not match their sha256; rewrite it with write_articles_file")
    return articles


@lru_cache(maxsize=2)
def wiki_articles(path: str | None = None) -> tuple[str, ...]:
    """Clean article texts of the gensim Wikipedia dump, in dump order.

    Without gensim, the default dump's articles come from ``$RSPARSE_CACHE/wiki_articles.json``
    when it exists (the same texts, cleaned where gensim is installed)."""
    try:
        from gensim.corpora.wikicorpus import filter_wiki
    except ImportError:
        cached = None if path else _articles_from_file()
        if cached is not None:
            return cached
        raise

    from vllm_rsparse.calibration.assets import wiki_dump

    src = Path(path) if path else wiki_dump()
    articles = []
    with bz2.open(src, "rb") as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.endswith("}text") or elem.tag == "text":
                raw = elem.text or ""
                if not raw.lower().startswith("#redirect"):
                    text = filter_wiki(raw)
                    text = re.sub(r"\n{3,}", "\n\n", text)
                    text = re.sub(r"[ \t]+", " ", text).strip()
                    if len(text) >= MIN_ARTICLE_CHARS:
                        articles.append(text)
            elem.clear()
    return tuple(articles)


def split_articles(articles: tuple[str, ...]) -> tuple[list[str], list[str]]:
    calib = [a for i, a in enumerate(articles) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [a for i, a in enumerate(articles) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return calib, heldout


class CalibrationTextError(ValueError):
    pass


def check_text_file(path: str | Path) -> Path:
    """A user's --text must be a readable file (checked before the model loads)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationTextError(f"calibration text {str(path)!r}: "
                                   + ("is a directory, not a text file" if path.is_dir() else "no such file"))
    return path


def calibration_text(path: str | None = None) -> str:
    """The calibration half of the default text, or a user's UTF-8 text file as is.

    Not decoded leniently: thresholds calibrated on a binary file or a text in another encoding
    (replacement characters tokenize to byte tokens the model never sees in use) would serve
    silently worse, so such a file is refused with the offset of its first bad byte."""
    if path:
        raw = check_text_file(path).read_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CalibrationTextError(
                f"calibration text {str(path)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                "give a plain-text file, converted to UTF-8 if needed (e.g. iconv -f latin1 -t utf-8)") from None
    return "\n\n".join(split_articles(wiki_articles())[0])


def heldout_text() -> str:
    return "\n\n".join(split_articles(wiki_articles())[1])


class TextTooShortError(ValueError):
    pass


def token_windows(tokenizer, text: str, num_windows: int, window: int, source: str = "text") -> torch.Tensor:
    """``num_windows`` consecutive non-overlapping windows of ``window`` tokens.

    -> input_ids [num_windows, window]; raises TextTooShortError (naming the sizes)
    when the text has fewer tokens than asked for.
    """
    if not text.strip():
        raise TextTooShortError(f"calibration {source} is empty")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    need = num_windows * window
    if ids.numel() < need:
        raise TextTooShortError(
            f"calibration {source} has {ids.numel()} tokens; {num_windows} windows of {window} "
            f"tokens need {need} (give more text, or lower --num-samples / --seq-len)"
        )
    return ids[:need].reshape(num_windows, window)
