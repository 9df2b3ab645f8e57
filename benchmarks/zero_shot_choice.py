"""Zero-shot multiple choice with MiniLM's own sentence embeddings: does the model know the answers?

Each option is scored by the cosine similarity of its mean-pooled all-MiniLM-L6-v2 embedding
with the question's (the way the model was trained), and the closest option is the answer. No
training, no adapter: a reference for what ``robustness.py``'s ARC pair classifier could reach
if it learned to use what the encoder already knows.

Usage::

    python -m benchmarks.zero_shot_choice            # first 500 test questions of ARC-Easy and OpenBookQA
    python -m benchmarks.zero_shot_choice --limit 0  # every test question
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel

from . import common


@torch.no_grad()
def embed(model: torch.nn.Module, texts: list[str], batch_size: int = 128) -> torch.Tensor:
    """Unit-norm mean-pooled embeddings (sentence-transformers' pooling for this model)."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = common.tokenizer()(texts[start:start + batch_size], padding=True, truncation=True, max_length=64,
                                   return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=500, help="test questions per set (0: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(common.minilm_path()).eval()
    for name in ("ARC-Easy", "openbookqa"):
        items = common._arc_items(name, "test")
        items = items[: args.limit] if args.limit else items
        questions = embed(model, [q for q, _, _ in items])
        options = embed(model, [o for _, opts, _ in items for o in opts]).reshape(len(items), 4, -1)
        choice = torch.einsum("nd,nkd->nk", questions, options).argmax(-1).numpy()
        answers = np.array([a for _, _, a in items])
        majority = np.bincount(answers, minlength=4).max() / len(answers)
        print(f"{name}: {len(items)} test questions, zero-shot accuracy {100 * (choice == answers).mean():.1f}% "
              f"(most frequent answer slot {100 * majority:.1f}%)")


if __name__ == "__main__":
    main()
