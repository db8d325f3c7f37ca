"""LitServe's way: a LitAPI with setup / decode_request / predict / encode_response, dynamic
batching (max_batch_size 16, batch_timeout 5 ms), one inference worker.

    PEER_MODEL_DIR=models/hyperkvasir-lgi/2 python -m bench.peers.litserve_app --port 8000
"""

from __future__ import annotations

import argparse

import litserve as ls
import numpy as np

from bench.peers.common import answer, pixels, session


class EndoscopyAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.session = session()

    def decode_request(self, request) -> np.ndarray:
        return pixels(request["image"].file.read())

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {"image": x})[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict:
        return answer(output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.005)
    args = parser.parse_args()
    api = EndoscopyAPI(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=30)
    server.run(port=args.port, generate_client_file=False)
