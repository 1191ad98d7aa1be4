"""Text that ships with Python itself: the standard library's source, as byte tokens.

No download, nothing to install: a fixed list of standard-library modules is read as
bytes (vocabulary 256), split into a training part and a validation part. Used by the
soak benchmark, and by character-level language-model checks.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from torchmesa.extras import MissingExtra

STDLIB_FILES = (
    "argparse.py",
    "dataclasses.py",
    "inspect.py",
    "typing.py",
    "textwrap.py",
    "pathlib.py",
    "collections/__init__.py",
    "functools.py",
    "subprocess.py",
    "tarfile.py",
)
VOCAB = 256


def stdlib_text(files: tuple[str, ...] = STDLIB_FILES) -> torch.Tensor:
    """The files' bytes, concatenated, as a flat ``uint8`` tensor.

    Raises:
        FileNotFoundError: a file is missing (the standard library was stripped).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for name in files:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"standard-library source {path} is missing; this Python ships without it"
            )
        chunks.append(path.read_bytes())
    return torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8)


class ByteBatches:
    """Random windows of a byte tensor: ``(ids, next_ids)`` pairs for next-byte prediction.

    The first ``1 - valid_fraction`` of the text is for training, the rest for validation;
    draws come from a generator of its own, so runs repeat exactly.
    """

    def __init__(self, text: torch.Tensor, seq: int, valid_fraction: float = 0.1, seed: int = 0):
        if not 0.0 < valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction!r}")
        cut = int(len(text) * (1 - valid_fraction))
        if min(cut, len(text) - cut) <= seq + 1:
            raise ValueError(f"text of {len(text)} bytes is too short for windows of {seq}")
        self.train, self.valid = text[:cut].long(), text[cut:].long()
        self.seq = seq
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` windows of ``seq`` bytes and the bytes that follow each position."""
        data = {"train": self.train, "valid": self.valid}.get(split)
        if data is None:
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        starts = torch.randint(0, len(data) - self.seq - 1, (batch,), generator=self.generator)
        windows = torch.stack([data[s : s + self.seq + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]


def load_digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 8x8 digits as ``(N, 1, 8, 8)`` in [0, 1]: a fixed 80/20 split."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise MissingExtra(
            "the demo needs scikit-learn for its data: pip install 'torchmesa[cli]'"
        ) from err
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]
