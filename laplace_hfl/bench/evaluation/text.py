"""A small transformer text classifier on offline synthetic token data.

Hugging Face-style: batches are dicts ``{"input_ids", "attention_mask",
"labels"}`` (laplace-torch's ``dict_key_x="input_ids"``,
``dict_key_y="labels"``) and the model takes the whole dict. The backbone
(embeddings and one self-attention block) is trained first and then frozen; a
zero-initialised low-rank adapter and the classification head are fine-tuned,
so only they have ``requires_grad`` (LoRA-like): the Laplace approximation is
over the adapter and head.

The data follow a learnable rule: each sequence of random filler tokens has
``n_key`` keywords of its class inserted at random positions and is padded to
``seq_len``; the class is recoverable from the bag of tokens. Generated in code
with a fixed seed, nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "synthetic_text",
    "DictDataset",
    "TinyTextClassifier",
    "train_text_classifier",
]

PAD = 0


def synthetic_text(
    n: int,
    n_classes: int = 4,
    vocab: int = 64,
    seq_len: int = 16,
    n_key: int = 2,
    label_noise: float = 0.1,
    seed: int = 0,
) -> dict[str, Tensor]:
    """``n`` padded token sequences with labels from a keyword rule.

    Tokens ``1 .. 4 * n_classes`` are keywords (four per class), the rest
    filler; sequence lengths are uniform in ``[seq_len // 2, seq_len]``.

    Parameters
    ----------
    n : int
        Number of sequences.
    n_classes, vocab, seq_len, n_key : int
        Classes, vocabulary size (incl. the pad token 0), padded length and
        keywords inserted per sequence.
    label_noise : float, default=0.1
        Fraction of labels replaced by a uniformly random class (so that the
        Bayes accuracy is below 1 and calibration matters).
    seed : int, default=0

    Returns
    -------
    dict of str to Tensor
        ``input_ids`` ``(n, seq_len)`` int64, ``attention_mask`` ``(n,
        seq_len)`` int64 (1 = token, 0 = pad), ``labels`` ``(n,)`` int64.

    Raises
    ------
    ValueError
        The vocabulary leaves no filler tokens.
    """
    n_kw = 4 * n_classes
    if vocab <= n_kw + 2:
        raise ValueError(f"vocab={vocab} must exceed 4 * n_classes + 2 = {n_kw + 2}.")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(n_classes, (n,), generator=g)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (n,), generator=g)
    ids = torch.randint(n_kw + 1, vocab, (n, seq_len), generator=g)
    for i in range(n):
        L = int(lengths[i])
        pos = torch.randperm(L, generator=g)[:n_key]
        kw = 1 + 4 * labels[i] + torch.randint(4, (n_key,), generator=g)
        ids[i, pos] = kw
        ids[i, L:] = PAD
    flip = torch.rand(n, generator=g) < label_noise
    labels = torch.where(flip, torch.randint(n_classes, (n,), generator=g), labels)
    mask = (torch.arange(seq_len) < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class DictDataset(Dataset):
    """Rows of a dict of equal-length tensors; the default collate gives dict batches."""

    def __init__(self, data: dict[str, Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return int(next(iter(self.data.values())).shape[0])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.data.items()}


class TinyTextClassifier(nn.Module):
    """Embedding + one single-head self-attention block + mean pool + adapter + head.

    Written with plain ``nn.Linear`` layers (no fused attention fast path) so
    that ``torch.func`` transforms and every curvature backend can trace it.
    ``forward`` takes a dict batch with ``input_ids`` and ``attention_mask``.
    """

    def __init__(
        self, vocab: int = 64, n_classes: int = 4, d: int = 32, rank: int = 4
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.adapter_down = nn.Linear(d, rank, bias=False)
        self.adapter_up = nn.Linear(rank, d, bias=False)
        nn.init.zeros_(self.adapter_up.weight)
        self.head = nn.Linear(d, n_classes)
        self.d = d

    def backbone(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self.embed(ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        att = q @ k.transpose(-1, -2) / math.sqrt(self.d)
        att = att.masked_fill(mask[:, None, :] == 0, -1e4).softmax(-1)
        h = h + self.proj(att @ v)
        h = h + self.mlp(h)
        m = mask.to(h.dtype)[..., None]
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, batch: MutableMapping) -> Tensor:
        z = self.backbone(batch["input_ids"], batch["attention_mask"])
        z = z + self.adapter_up(self.adapter_down(z))
        return self.head(z)

    def freeze_backbone(self) -> TinyTextClassifier:
        """Only the adapter and the head keep ``requires_grad`` (LoRA-like)."""
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith(("adapter_", "head.")))
        return self


def _train(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(batch), batch["labels"]).backward()
            opt.step()
    for p in model.parameters():
        p.grad = None


def train_text_classifier(
    data: dict[str, Tensor],
    pretrain_epochs: int = 6,
    finetune_epochs: int = 4,
    seed: int = 0,
    **model_kw: int,
) -> TinyTextClassifier:
    """Pretrain the whole model, freeze the backbone, fine-tune adapter + head.

    Returns the model in eval mode with only the adapter and head trainable.
    """
    torch.manual_seed(seed)
    model = TinyTextClassifier(**model_kw)
    loader = DataLoader(DictDataset(data), batch_size=64, shuffle=True)
    _train(model, loader, pretrain_epochs, 3e-3)
    model.freeze_backbone()
    nn.init.normal_(model.head.weight, std=0.1)
    nn.init.zeros_(model.head.bias)
    _train(model, loader, finetune_epochs, 3e-3)
    return model.eval()
