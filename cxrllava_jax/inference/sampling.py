"""The ranges of the sampling options, in one place: `SamplingOptions` checks them, so the Python API, the command
line's flags (`--temperature`, `--top-p`, `--max-new-tokens`, `--seed`) and the server's request fields
(`temperature`, `top_p`, `max_tokens`, `seed`) accept and refuse the same values, each naming its own field.

Values are used as given, never wrapped or rounded into range: a seed of 2**32 is refused, not taken as 0.
The decoder works in float32: a positive top_p or temperature too small for float32 would silently become 0
there (top_p 1e-300 kept no token at all), so both have a floor below which they mean what their smallest
meaningful value means (see `TOP_P_FLOOR`, `TEMPERATURE_FLOOR`).
"""

import numbers

import numpy as np

from cxrllava_jax.errors import ConfigError

MAX_TEMPERATURE = 2.0  # OpenAI's range; past it the distribution is all but uniform noise
SEED_RANGE = 2**32  # jax.random.key takes 32 bits; larger seeds would wrap onto smaller ones
# top_p in (0, TOP_P_FLOOR] keeps the most likely token only (the nucleus always holds it), as float32 can say.
TOP_P_FLOOR = float(np.finfo(np.float32).tiny)
# A temperature below this is greedy decoding: at 1e-3 a logit gap of 0.02 is already odds of e**20 to 1, and far
# smaller temperatures overflow float32 (logits / 1e-40 is inf, and the draw NaN).
TEMPERATURE_FLOOR = 1e-3


class SamplingError(ConfigError):
    """A sampling option out of its range: `option` (the SamplingOptions field), `value`, and `requirement`, the
    words that complete "must be ...", so that each caller can name its own field or flag."""

    def __init__(self, option: str, value, requirement: str):
        super().__init__(f"{option}={shown(value)}: must be {requirement}")
        self.option, self.value, self.requirement = option, value, requirement


def checked(temperature, top_p, max_new_tokens, seed) -> tuple[float, float, int, int]:
    """The four options as the decoder uses them, or a SamplingError naming the first one out of range."""
    if not _real(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:  # NaN fails every comparison
        raise SamplingError("temperature", temperature, f"a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy)")
    if not _real(top_p) or not 0 < top_p <= 1:
        raise SamplingError("top_p", top_p, "a number in (0, 1]")
    if not _integer(max_new_tokens) or max_new_tokens < 1:
        raise SamplingError("max_new_tokens", max_new_tokens, "an integer >= 1")
    if not _integer(seed) or not 0 <= seed < SEED_RANGE:
        raise SamplingError("seed", seed, "an integer in [0, 2**32)")
    temperature = 0.0 if temperature < TEMPERATURE_FLOOR else float(temperature)
    return temperature, max(float(top_p), TOP_P_FLOOR), int(max_new_tokens), int(seed)


def shown(value) -> str:
    """A value for a message, cut short: a 5,000-digit number is named by its length, not printed."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text):,} characters)"


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
