"""Rewards served over HTTP: a JSON client and a small threaded stdlib server.

Large reward models (GenEval detectors, LLaVA, UnifiedReward) usually run in their own process or on
their own GPU and are queried over HTTP (DDPO's LLaVA server, Flow-GRPO's GenEval server). Those servers
speak pickle; this protocol is JSON so that neither side unpickles what the other sends:

    POST <url>   {"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [dict, ...] | null}
    200          {"scores": [float, ...], "info": {key: [per-sample value, ...]}}     ("info" optional)
    4xx / 5xx    {"error": "message"}

Images travel as 8-bit PNG, so the server sees them rounded to multiples of 1/255 (DDPO and Flow-GRPO
also round to uint8, then send quality-80 or default-quality JPEGs). The client is not differentiable.

    server = serve_reward(JpegCompressibility(), port=0)        # background thread, ephemeral port
    reward = HttpReward(server.url)
    scores, info = reward(images, prompts)
    server.shutdown()

Command line: `python -m common.rewards.http jpeg_compressibility --port 8000 [--arg key=value ...]`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from common.rewards.base import Metadata, Reward, check_inputs, check_scores

# ---------------------------------------------------------------------------------------------------
# Image <-> base64 PNG
# ---------------------------------------------------------------------------------------------------


def encode_png(image: Tensor) -> str:
    """(3, H, W) in [0, 1] -> base64 of an 8-bit RGB PNG."""
    array = (image.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(data: str) -> Tensor:
    """base64 image (any format PIL reads) -> (3, H, W) float32 in [0, 1]."""
    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


# ---------------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------------


class HttpReward:
    """Scores images by POSTing them to a reward server (see the module docstring for the protocol).

    url: the server's endpoint; timeout: seconds to wait for one request;
    batch_size: images per request (None: the whole batch in one request).
    """

    name = "http"

    def __init__(self, url: str, timeout: float = 60.0, batch_size: int | None = None):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"http: url must start with http:// or https://, got {url!r}")
        if not timeout > 0:
            raise ValueError(f"http: timeout must be > 0 seconds, got {timeout}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"http: batch_size must be >= 1 or None, got {batch_size}")
        self.url, self.timeout, self.batch_size = url, float(timeout), batch_size

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            body = json.dumps(payload, allow_nan=False).encode()
        except (TypeError, ValueError) as err:
            raise ValueError(f"http: metadata must be JSON-serialisable: {err}") from err
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except (ValueError, AttributeError):
                pass
            # 400: the server rejected the request (bad inputs); anything else: the server failed
            kind = ValueError if err.code == 400 else RuntimeError
            raise kind(f"http: reward server at {self.url} answered {err.code}: {detail}") from err
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            raise ConnectionError(f"http: cannot reach reward server at {self.url} "
                                  f"(timeout {self.timeout}s): {reason}") from err
        try:
            answer = json.loads(raw)
        except ValueError as err:
            raise ValueError(f"http: reward server at {self.url} did not answer JSON: {raw[:200]!r}") from err
        if not isinstance(answer, dict) or "scores" not in answer:
            raise ValueError(f"http: reward server at {self.url} answered without a 'scores' field")
        return answer

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Metadata = None
                 ) -> tuple[Tensor, dict[str, Any]]:
        check_inputs(images, prompts, metadata, name=self.name)
        n = images.shape[0]
        step = self.batch_size or max(n, 1)
        scores: list[float] = []
        info: dict[str, list[Any]] = {}
        for start in range(0, n, step):
            stop = min(start + step, n)
            answer = self._post({
                "images": [encode_png(image) for image in images[start:stop]],
                "prompts": list(prompts[start:stop]),
                "metadata": None if metadata is None else list(metadata[start:stop]),
            })
            chunk = answer["scores"]
            if not isinstance(chunk, list) or len(chunk) != stop - start:
                got = len(chunk) if isinstance(chunk, list) else type(chunk).__name__
                raise ValueError(f"http: reward server at {self.url} returned {got} scores for "
                                 f"{stop - start} images")
            for i, value in enumerate(chunk):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"http: score of sample {start + i} is {value!r}, not a number")
            scores.extend(float(v) for v in chunk)
            for key, values in (answer.get("info") or {}).items():
                if isinstance(values, list) and len(values) == stop - start:
                    info.setdefault(key, []).extend(values)
        out = check_scores(torch.tensor(scores, dtype=torch.float32, device=images.device), name=self.name)
        return out, {k: _maybe_tensor(v, images.device) for k, v in info.items() if len(v) == n}


def _maybe_tensor(values: list[Any], device: torch.device) -> Any:
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.float32, device=device)
    return values


# ---------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------


class RewardServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding one reward; requests are scored one at a time (a lock guards
    the model)."""

    daemon_threads = True

    def __init__(self, reward: Reward, host: str, port: int, verbose: bool = False):
        super().__init__((host, port), _RewardHandler)
        self.reward = reward
        self.lock = threading.Lock()
        self.verbose = verbose

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class _RewardHandler(BaseHTTPRequestHandler):
    server: RewardServer

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()  # NaN is written as NaN; the client rejects it by name
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if not isinstance(request, dict) or "images" not in request or "prompts" not in request:
                raise ValueError("request must be a JSON object with 'images' and 'prompts'")
            try:
                decoded = [decode_png(item) for item in request["images"]]
            except Exception as err:
                raise ValueError(f"images must be base64-encoded PNGs: {err}") from err
            if not decoded:
                raise ValueError("images is empty")
            if len({tuple(image.shape) for image in decoded}) != 1:
                raise ValueError("all images of one request must have the same size")
            images = torch.stack(decoded)
            with self.server.lock, torch.no_grad():
                scores, info = self.server.reward(images, request["prompts"], request.get("metadata"))
            answer = {"scores": [float(s) for s in torch.as_tensor(scores).detach().flatten().cpu()],
                      "info": _per_sample_lists(info, len(decoded))}
        except ValueError as err:
            self._send(400, {"error": str(err)})
            return
        except Exception as err:  # report, keep serving
            self._send(500, {"error": f"{type(err).__name__}: {err}"})
            return
        self._send(200, answer)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


def _per_sample_lists(info: dict[str, Any], n: int) -> dict[str, list[Any]]:
    """Keep the info entries that have one JSON value per sample."""
    out = {}
    for key, value in info.items():
        if isinstance(value, Tensor) and value.ndim == 1 and value.shape[0] == n:
            out[key] = [float(v) if math.isfinite(float(v)) else None for v in value.detach().cpu()]
        elif isinstance(value, list | tuple) and len(value) == n:
            try:
                json.dumps(list(value))
            except (TypeError, ValueError):
                continue
            out[key] = list(value)
    return out


def serve_reward(reward: Reward, host: str = "127.0.0.1", port: int = 8000, *, block: bool = False,
                 verbose: bool = False) -> RewardServer:
    """Serve `reward` at http://host:port/ (port 0: a free port, read `server.url`).

    block=False runs the server in a daemon thread and returns it (stop it with `server.shutdown()`
    then `server.server_close()`); block=True serves in this thread until interrupted.
    """
    server = RewardServer(reward, host, port, verbose=verbose)
    if block:
        try:
            server.serve_forever()
        finally:
            server.server_close()
    else:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="reward-server",
                         daemon=True).start()
    return server


def main(argv: Sequence[str] | None = None) -> None:
    from common.rewards import REWARD_NAMES, load_reward

    parser = argparse.ArgumentParser(description="Serve one reward over HTTP (JSON protocol).")
    parser.add_argument("reward", choices=[n for n in REWARD_NAMES if n != "http"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword for the reward's constructor; VALUE is parsed as JSON if it can be")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {}
    for item in args.arg:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--arg {item!r} must look like KEY=VALUE")
        try:
            kwargs[key] = json.loads(value)
        except ValueError:
            kwargs[key] = value
    reward = load_reward(args.reward, **kwargs)
    server = RewardServer(reward, args.host, args.port, verbose=True)
    print(f"serving {args.reward} at {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
