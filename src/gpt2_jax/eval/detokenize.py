"""Detokenizers that undo the pre-tokenization of the classic LM benchmarks.

The GPT-2 paper (Radford et al. 2019, section 3.1) scores WikiText, PTB, 1BW and CBT "using
invertible de-tokenizers which remove as many of these tokenization / pre-processing artifacts as
possible"; it reports gains of 2.5 to 5 perplexity from them but does not publish them. These are
our own rules. Each one only removes spaces that the benchmark's tokenizer inserted (or rewrites
WikiText's `@-@` escapes), so the original can be rebuilt and the number of original words, the
perplexity normalizer, is unchanged. Newlines are kept: they stand for the `<eos>` word.
"""

from __future__ import annotations

import re

# Space inserted before closing punctuation / after opening brackets by Moses-style tokenizers.
_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{$£#]) ")
# English clitics split off by PTB-style tokenizers ("do n't", "John 's", "we 're").
_CLITICS = re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m|'S|'RE|'VE|'LL|'D|'M|N'T)\b")
# A double-quoted span written with spaces inside: `" word word "`.
_QUOTED = re.compile(r'" ([^"\n]*?) "')
# WikiText escapes hyphens, thousands separators and decimal points inside numbers/words.
_WIKI_ESCAPES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


def _detokenize_line(line: str) -> str:
    line = _CLITICS.sub(r"\1", line)
    line = _QUOTED.sub(r'"\1"', line)
    line = _SPACE_BEFORE.sub(r"\1", line)
    return _SPACE_AFTER.sub(r"\1", line)


def wikitext_detokenize(text: str) -> str:
    """WikiText (`wiki.*.tokens`) -> natural text: `@-@` escapes, punctuation, quotes, headings.

    Every line of the file is ` content \\n`; the outer spaces are dropped, section headings
    ` = = Title = = ` become `== Title ==`.
    """
    out = []
    for line in text.split("\n"):
        line = line.strip(" ")
        for escaped, plain in _WIKI_ESCAPES:
            line = line.replace(escaped, plain)
        if line.startswith("= ") and line.endswith(" ="):
            line = re.sub(r"(?<==) (?==)", "", line)  # "= = Title = =" -> "== Title =="
            out.append(line)
        else:
            out.append(_detokenize_line(line))
    return "\n".join(out)


def ptb_detokenize(text: str) -> str:
    """Penn Treebank (Mikolov's `ptb.*.txt`): lower case, `N` for numbers, `<unk>`, no punctuation.

    Only clitics were split off ("abc 's", "we 've"); they are re-attached and each line's outer
    spaces dropped. `<unk>` and `N` stay: they are words of the benchmark's vocabulary.
    """
    return "\n".join(_CLITICS.sub(r"\1", line.strip(" ")) for line in text.split("\n"))


def moses_detokenize(text: str) -> str:
    """Generic detokenizer for PTB-style tokenized prose (CBT, One Billion Word).

    Besides punctuation and clitics it turns the PTB quote marks `` and '' into `"`.
    """
    text = text.replace("``", '"').replace("''", '"')
    return "\n".join(_detokenize_line(line.strip(" ")) for line in text.split("\n"))


def count_words(text: str) -> int:
    """Words of a tokenized benchmark split: whitespace-separated tokens plus one `<eos>` per line.

    This is the count the benchmarks' own perplexities are normalized by: 73,760 for PTB validation
    (Mikolov et al. 2010's data), 217,646 for WikiText-2/103 validation (Merity et al. 2016, Table 1).
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]  # the file's final newline ends the last line, it does not start one
    return sum(len(line.split()) for line in lines) + len(lines)
