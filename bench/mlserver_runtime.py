"""MLServer's runtime, in its own venv (mlserver, torch, transformers): the raw pipeline."""

from __future__ import annotations

import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class MiniLM(MLModel):
    """One label and score per text of a batch (a BYTES input of any name)."""

    async def load(self) -> bool:
        torch.set_num_threads(2)
        path = self.settings.parameters.uri
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        self.labels = self.model.config.id2label
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        texts = StringCodec.decode_input(payload.inputs[0])
        enc = self.tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode():
            scores, idx = torch.softmax(self.model(**enc).logits.float(), dim=-1).max(dim=-1)
        outputs = [StringCodec.encode_output("label", [self.labels[i] for i in idx.tolist()])]
        outputs.append(NumpyCodec.encode_output("score", scores.numpy()))
        return InferenceResponse(model_name=self.name, outputs=outputs)
