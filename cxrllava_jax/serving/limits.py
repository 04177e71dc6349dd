"""What one request may hold, and the error a refused request raises (turned into an OpenAI-style JSON body)."""

import dataclasses

from cxrllava_jax.inference.engine import RELEASE_MAX_NEW_TOKENS

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 64 * MIB  # an uncompressed 16-bit 4k x 4k DICOM is 32 MiB
    max_image_pixels: int = 40_000_000
    # Memory for decoding images at once (`serving.admission`): one 40-megapixel 16-bit image needs ~230 MiB.
    max_decode_bytes: int = 512 * MIB
    max_prompt_tokens: int | None = None  # None: whatever fits the model's context
    max_output_tokens: int = RELEASE_MAX_NEW_TOKENS
    # The conversation's text, refused before it is tokenized: 64 characters a token would not fit the release's
    # context of 4,096 tokens (English text averages about 4).
    max_text_chars: int = 256 * 1024

    @property
    def max_body_bytes(self) -> int:
        """A request body: one image as base64 (4/3 of its bytes) plus the conversation's text."""
        return self.max_image_bytes * 4 // 3 + 4 * MIB


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, a message naming what is wrong, the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
                503: "server_overloaded"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
