"""Tiny Penn-Treebank-format files (``ptb/ptb.{train,valid,test}.txt``) for the fast tests.

Same on-disk format as Mikolov's files: one sentence per line, words separated by single spaces, every line
starting with a space, ``<unk>`` for rare words. Sentences follow a simple Markov chain over a small vocabulary
(each word is followed by one of two successors), so a language model can learn them quickly.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(30)] + ["<unk>", "the", "of", "n't", "$", "N"]


def fake_ptb_lines(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        w = rng.randrange(len(WORDS))
        words = []
        for _ in range(rng.randint(3, 12)):
            words.append(WORDS[w])
            w = (w * 7 + rng.choice((1, 2))) % len(WORDS)
        lines.append(" " + " ".join(words) + " ")
    return lines


def write_fake_ptb(root: Path, n_train: int = 400, n_valid: int = 60, n_test: int = 60, seed: int = 0) -> Path:
    """Write ``root/ptb/ptb.{train,valid,test}.txt`` and return ``root``.

    The validation and test lines only use words of the training split (as in the real PTB).
    """
    ptb = root / "ptb"
    ptb.mkdir(parents=True, exist_ok=True)
    for name, n, s in (("train", n_train, seed), ("valid", n_valid, seed + 1), ("test", n_test, seed + 2)):
        lines = fake_ptb_lines(n, s)
        if name == "train":  # make sure every word occurs in training
            lines.append(" " + " ".join(WORDS) + " ")
        (ptb / f"ptb.{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def count_tokens(path: Path) -> tuple[int, int]:
    """(lines, words + one <eos> per line) of a PTB file, counted independently of the reader."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return len(lines), sum(len(line.split()) + 1 for line in lines)
