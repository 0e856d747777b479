"""Tiny UCI Adult / Default / Bank files in the exact on-disk formats of the real ones (see the data README)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ADULT_CATS = {
    "workclass": ["Private", "Self-emp-not-inc", "State-gov", "?"],
    "education": ["Bachelors", "HS-grad", "11th", "Masters"],
    "marital-status": ["Never-married", "Married-civ-spouse", "Divorced"],
    "occupation": ["Adm-clerical", "Exec-managerial", "Handlers-cleaners", "?"],
    "relationship": ["Not-in-family", "Husband", "Own-child", "Wife"],
    "race": ["White", "Black", "Asian-Pac-Islander"],
    "native-country": ["United-States", "Mexico", "?"],
}


def _adult_rows(rng: np.random.Generator, n: int, test: bool) -> list[str]:
    rows = []
    for _ in range(n):
        age = int(rng.integers(17, 80))
        sex = "Female" if rng.random() < 0.35 else "Male"
        edu_num = int(rng.integers(3, 16))
        hours = int(rng.integers(10, 70))
        score = 0.08 * (age - 38) + 0.5 * (edu_num - 10) + 0.05 * (hours - 40) - (0.7 if sex == "Female" else 0)
        label = ">50K" if score + rng.normal() > 0.8 else "<=50K"
        cats = {k: v[int(rng.integers(len(v)))] for k, v in ADULT_CATS.items()}
        fields = [
            str(age),
            cats["workclass"],
            str(int(rng.integers(20000, 400000))),
            cats["education"],
            str(edu_num),
            cats["marital-status"],
            cats["occupation"],
            cats["relationship"],
            cats["race"],
            sex,
            str(int(rng.choice([0, 0, 0, 2174, 14084]))),
            str(int(rng.choice([0, 0, 1902]))),
            str(hours),
            cats["native-country"],
            label + ("." if test else ""),
        ]
        rows.append(", ".join(fields))
    return rows


def write_fake_adult(root: Path, n_train: int = 160, n_test: int = 80, seed: int = 0) -> Path:
    """``root/adult/adult.data`` (trailing blank line) and ``adult.test`` (``|1x3 Cross validator`` first line,
    labels ending with '.'), ``, ``-separated like UCI's files."""
    rng = np.random.default_rng(seed)
    d = root / "adult"
    d.mkdir(parents=True, exist_ok=True)
    (d / "adult.data").write_text("\n".join(_adult_rows(rng, n_train, test=False)) + "\n\n")
    (d / "adult.test").write_text("|1x3 Cross validator\n" + "\n".join(_adult_rows(rng, n_test, test=True)) + "\n")
    return d


DEFAULT_NAMES = [
    "ID",
    "LIMIT_BAL",
    "SEX",
    "EDUCATION",
    "MARRIAGE",
    "AGE",
    "PAY_0",
    "PAY_2",
    "PAY_3",
    "PAY_4",
    "PAY_5",
    "PAY_6",
    *(f"BILL_AMT{i}" for i in range(1, 7)),
    *(f"PAY_AMT{i}" for i in range(1, 7)),
    "default payment next month",
]


def default_rows(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pay = [int(v) for v in rng.integers(-2, 4, size=6)]
        limit = int(rng.integers(1, 50)) * 10000
        y = int(sum(pay) / 6 + rng.normal() > 1.0)
        row = [
            i + 1,
            limit,
            int(rng.integers(1, 3)),
            int(rng.integers(0, 7)),
            int(rng.integers(0, 4)),
            int(rng.integers(21, 70)),
            *pay,
            *(int(v) for v in rng.integers(-1000, 100000, size=6)),
            *(int(v) for v in rng.integers(0, 20000, size=6)),
            y,
        ]
        rows.append(row)
    return rows


def write_fake_default(root: Path, n: int = 200, seed: int = 0, kaggle: bool = False) -> Path:
    """``root/credit_default/default_of_credit_card_clients.csv``: UTF-8 BOM, CRLF, no final newline, two header
    rows (``,X1,…,X23,Y`` then the names) — or, with ``kaggle``, the one-header ``UCI_Credit_Card.csv`` layout."""
    d = root / "credit_default"
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    if kaggle:
        names = [*DEFAULT_NAMES[:-1], "default.payment.next.month"]
        lines.append(",".join(names))
    else:
        lines.append("," + ",".join(f"X{i}" for i in range(1, 24)) + ",Y")
        lines.append(",".join(DEFAULT_NAMES))
    lines += [",".join(str(v) for v in row) for row in default_rows(n, seed)]
    path = d / "default_of_credit_card_clients.csv"
    path.write_bytes(("\ufeff" + "\r\n".join(lines)).encode("utf-8"))
    return path


BANK_COLUMNS = [
    "age",
    "job",
    "marital",
    "education",
    "default",
    "balance",
    "housing",
    "loan",
    "contact",
    "day",
    "month",
    "duration",
    "campaign",
    "pdays",
    "previous",
    "poutcome",
    "y",
]


def write_fake_bank(root: Path, n: int = 200, seed: int = 0, sep: str = ";", name: str = "bank-full.csv") -> Path:
    """``root/bank_marketing/bank/bank-full.csv``: ``;``-separated, every header and string field quoted."""
    rng = np.random.default_rng(seed)
    d = root / "bank_marketing" / "bank"
    d.mkdir(parents=True, exist_ok=True)
    jobs = ["management", "technician", "student", "blue-collar"]
    lines = [sep.join(f'"{c}"' for c in BANK_COLUMNS)]
    for _ in range(n):
        age = int(rng.integers(18, 70))
        duration = int(rng.integers(5, 1500))
        y = "yes" if duration / 500 + rng.normal() > 1.5 else "no"
        fields = [
            str(age),
            f'"{jobs[int(rng.integers(4))]}"',
            f'"{["married", "single", "divorced"][int(rng.integers(3))]}"',
            f'"{["primary", "secondary", "tertiary", "unknown"][int(rng.integers(4))]}"',
            f'"{["no", "yes"][int(rng.integers(2))]}"',
            str(int(rng.integers(-500, 5000))),
            f'"{["no", "yes"][int(rng.integers(2))]}"',
            f'"{["no", "yes"][int(rng.integers(2))]}"',
            f'"{["unknown", "cellular"][int(rng.integers(2))]}"',
            str(int(rng.integers(1, 31))),
            f'"{["may", "jun", "jul"][int(rng.integers(3))]}"',
            str(duration),
            str(int(rng.integers(1, 10))),
            str(int(rng.choice([-1, -1, 100, 200]))),
            str(int(rng.integers(0, 3))),
            f'"{["unknown", "success", "failure"][int(rng.integers(3))]}"',
            f'"{y}"',
        ]
        lines.append(sep.join(fields))
    path = d / name
    path.write_text("\n".join(lines) + "\n")
    return path
