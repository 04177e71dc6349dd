"""A live `cxrllava serve` application in a thread of the test process, and plain HTTP helpers around it."""

import base64
import http.client
import json
import mimetypes
import socket
import threading
import time
import uuid
from pathlib import Path

import uvicorn

from cxrllava_jax.inference.api import CXRLLaVA
from cxrllava_jax.inference.engine import Engine
from cxrllava_jax.models import cxr_llava
from cxrllava_jax.reference.tiny_models import checkpoint_dir

NIH_PNG = Path(__file__).parent / "fixtures" / "real-cxr" / "nih" / "00000001_000.png"
NON_CHEST_DICOM = Path(__file__).parent / "fixtures" / "real-cxr" / "dicom" / "RG3_J2KR.dcm"


def endless_tiny_model(engine=Engine) -> CXRLLaVA:
    """The tiny model with EOS never ending an answer: every answer is exactly its token budget long, so tests do
    not depend on when an untrained model happens to write EOS. `engine`: the Engine class to run it."""
    model = CXRLLaVA.from_pretrained(checkpoint_dir())
    model.engine = engine(cxr_llava.CXRLLaVAModel(model.config), model.engine.params, eos_id=-1,
                          vocab_limit=len(model.tokenizer))
    return model


class LiveServer:
    """uvicorn serving `app` on a free localhost port until `close()`."""

    def __init__(self, app):
        listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = listener.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def scheduler(self):
        return self.app.state.scheduler

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """-> (status, parsed JSON or raw bytes)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.getheader("content-type", "").startswith("application/json"):
            return response.status, json.loads(data)
        return response.status, data

    def post_json(self, path: str, payload, key: str | None = None):
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", path, body, headers)

    def open_stream(self, payload: dict, key: str | None = None) -> tuple[http.client.HTTPConnection, object]:
        """Starts a streamed chat completion; read `response` line by line, `conn.close()` to hang up."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        conn.request("POST", "/v1/chat/completions", body=json.dumps({**payload, "stream": True}), headers=headers)
        return conn, conn.getresponse()

    def wait_for(self, condition, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while not condition(self.scheduler.stats()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"scheduler never reached the expected state: {self.scheduler.stats()}")
            time.sleep(0.01)


def data_url(path_or_bytes, media_type: str | None = None) -> str:
    if isinstance(path_or_bytes, (str, Path)):
        media_type = media_type or ("application/dicom" if str(path_or_bytes).endswith(".dcm")
                                    else mimetypes.guess_type(str(path_or_bytes))[0])
        path_or_bytes = Path(path_or_bytes).read_bytes()
    return f"data:{media_type};base64,{base64.b64encode(path_or_bytes).decode()}"


def image_message(text: str, url: str) -> dict:
    return {"role": "user",
            "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    """-> (body, content type) of a multipart/form-data form; files: name -> (filename, bytes), or a list of them
    (the field sent once for each)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for name, filename, data in [(name, *file) for name, given in files.items()
                                 for file in (given if isinstance(given, list) else [given])]:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
