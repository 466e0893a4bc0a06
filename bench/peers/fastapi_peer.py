"""A FastAPI server with an asyncio dynamic batcher, in the style of the Python VLA API the
appliance grows from: the handler decodes the request in a worker thread, queues it, and one
batcher task forms batches (the first request waits up to --batch-timeout-ms for company, up to
--max-batch) and runs each forward in a single-thread executor, so the event loop stays free.

    python bench/peers/fastapi_peer.py --model-dir DIR --port 8500 --cert cert.pem --key key.pem
"""

import asyncio
import concurrent.futures

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import common

args = common.arguments(__doc__.split("\n\n")[0])
model = common.Model(args.model_dir, args.threads)
app = FastAPI()
queue: asyncio.Queue = asyncio.Queue(maxsize=1024)
forward_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)


async def batcher():
    loop = asyncio.get_running_loop()
    while True:
        first = await queue.get()
        batch = [first]
        deadline = loop.time() + args.batch_timeout_ms / 1000.0
        while len(batch) < args.max_batch:
            left = deadline - loop.time()
            try:
                # Past the window (or with none): whatever is queued now joins.
                batch.append(queue.get_nowait() if left <= 0 else await asyncio.wait_for(queue.get(), left))
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
        started = common.now_ms()
        images = np.stack([b[0][0] for b in batch])
        tokens = np.stack([b[0][1] for b in batch])
        states = np.stack([b[0][2] for b in batch])
        try:
            actions = await loop.run_in_executor(forward_pool, model.forward, images, tokens, states)
        except Exception as e:  # noqa: BLE001 - every waiter must hear of it
            for _, future, _ in batch:
                future.set_exception(e)
            continue
        inference = common.now_ms() - started
        for (_, future, queued), action in zip(batch, actions):
            if not future.done():
                future.set_result((action, started - queued, inference, len(batch)))


@app.on_event("startup")
async def start_batcher():
    asyncio.get_running_loop().create_task(batcher())


@app.get("/health")
async def health():
    return {"status": "ok"}


@app.post("/v1/inference")
async def infer(request: Request):
    t0 = common.now_ms()
    body = await request.json()
    try:
        sample = await asyncio.to_thread(model.preprocess, body)
    except (ValueError, OSError) as e:
        return JSONResponse({"error": str(e), "code": "invalid_request"}, status_code=422)
    preprocess = common.now_ms() - t0
    future = asyncio.get_running_loop().create_future()
    await queue.put((sample, future, common.now_ms()))
    action, queued, inference, size = await future
    timing = {"total_ms": common.now_ms() - t0, "queue_ms": queued, "preprocess_ms": preprocess,
              "inference_ms": inference, "batch_size": size}
    return model.answer(action, timing)


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=args.port, ssl_certfile=args.cert, ssl_keyfile=args.key,
                log_level="warning", access_log=False)
