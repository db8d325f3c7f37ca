"""The simplest server: a sync FastAPI endpoint (FastAPI runs it on its thread pool), one
ONNX Runtime session shared by every request thread, batch 1.

    PEER_MODEL_DIR=models/hyperkvasir-lgi/2 uvicorn bench.peers.plain_fastapi:app
"""

from __future__ import annotations

from fastapi import FastAPI, File, UploadFile

from bench.peers.common import answer, pixels, session

app = FastAPI()
sess = session()


@app.post("/predict")
def predict(image: UploadFile = File(...)) -> dict:
    x = pixels(image.file.read())[None]
    probs = sess.run(["probabilities"], {"image": x})[0][0]
    return answer(probs)
