"""LitServe (Lightning AI's serving engine on FastAPI) with its dynamic batching, serving the
same model with the same preprocessing: `decode_request` decodes one request, `batch` stacks,
`predict` runs the forward, `unbatch` and `encode_response` answer each robot.

    python bench/peers/litserve_peer.py --model-dir DIR --port 8501 --cert cert.pem --key key.pem
"""

import numpy as np
import litserve as ls

import common

args = common.arguments(__doc__.split("\n\n")[0])


class VlaAPI(ls.LitAPI):
    def setup(self, device):
        self.model = common.Model(args.model_dir, args.threads)

    def decode_request(self, request):
        return self.model.preprocess(request)

    def batch(self, inputs):
        return tuple(np.stack([x[i] for x in inputs]) for i in range(3))

    def predict(self, x):
        started = common.now_ms()
        actions = self.model.forward(*x)
        inference = common.now_ms() - started
        return [(a, inference, len(actions)) for a in actions]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        action, inference, size = output
        timing = {"total_ms": 0.0, "queue_ms": 0.0, "preprocess_ms": 0.0, "inference_ms": inference, "batch_size": size}
        return self.model.answer(action, timing)


if __name__ == "__main__":
    api = VlaAPI(max_batch_size=args.max_batch, batch_timeout=args.batch_timeout_ms / 1000.0, api_path="/v1/inference")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, ssl_certfile=args.cert, ssl_keyfile=args.key, log_level="warning",
               generate_client_file=False)
