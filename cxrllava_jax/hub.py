"""Model references: a local directory, or a Hugging Face Hub id resolved through `huggingface_hub`'s cache.

    resolve("ckpt/cxr_llava_v2")            # an existing directory: itself
    resolve("ECOFRI/CXR-LLAVA-v2")          # the Hub: the cached snapshot, downloaded first when not cached
    resolve("ECOFRI/CXR-LLAVA-v2@a1b2c3d")  # a revision (branch, tag or commit) after '@'

Every place that takes a model (the Python API, every command's --checkpoint/--adapter/--src, `config.init.*` in
training, eval.py) goes through `resolve`, so each takes the same references. An existing local directory always
wins. The Hub's own settings apply as `huggingface_hub` reads them: `HF_TOKEN` (or `huggingface-cli login`),
`HF_HUB_CACHE`/`HF_HOME` for the cache, `HF_HUB_OFFLINE=1` to use the cache alone, `HF_ENDPOINT` for a mirror.
"""

import re
from pathlib import Path

from cxrllava_jax.errors import InputError

# PyTorch pickles, TF, Flax, ONNX and GGUF copies of weights some repositories carry beside their safetensors:
# never read here, so never downloaded.
UNREAD_WEIGHT_FILES = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.tflite"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHED_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[0-9a-f]{40}")


def resolve(reference, *, revision: str | None = None, token: str | bool | None = None,
            cache_dir=None, what: str = "model") -> Path:
    """The local directory `reference` names: an existing directory as it is, else the snapshot of the Hub
    repository `OWNER/NAME[@REVISION]` in the Hugging Face cache (downloaded unless offline or cached).

    `revision`, `token`, `cache_dir`: as `huggingface_hub.snapshot_download` takes them (defaults: its own, from
    the environment). `what` names the reference in errors (e.g. '--checkpoint', 'config.init.llama')."""
    text = str(reference)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    repo_id, _, pinned = text.partition("@")
    if not _REPO_ID.match(repo_id) or text.startswith((".", "/", "~")):
        raise InputError(f"{what}={text}: no such directory (and not a Hugging Face Hub id such as OWNER/NAME)")
    if pinned and revision and pinned != revision:
        raise InputError(f"{what}={text}: names revision {pinned!r}, but revision={revision!r} was also given")
    return _snapshot(repo_id, pinned or revision, token, cache_dir, f"{what}={text}")


def hub_id(path) -> str | None:
    """'OWNER/NAME' when `path` is a snapshot in a Hugging Face cache (what `resolve` returns for a Hub id), else
    None: how a model card names a base model that came from the Hub."""
    found = _CACHED_SNAPSHOT.search(Path(path).absolute().as_posix())
    return f"{found['owner']}/{found['name']}" if found else None


def _snapshot(repo_id: str, revision, token, cache_dir, named: str) -> Path:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub import errors as hub_errors

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                                      ignore_patterns=UNREAD_WEIGHT_FILES))
    except hub_errors.LocalEntryNotFoundError as error:
        cache = cache_dir or constants.HF_HUB_CACHE
        why = ("HF_HUB_OFFLINE is set" if constants.is_offline_mode()
               else f"the Hub ({constants.ENDPOINT}) cannot be reached")
        raise InputError(f"{named}: not a local directory, not in the Hugging Face cache ({cache}) and {why}; "
                         "download it once with the network on, or pass its directory") from error
    except hub_errors.RevisionNotFoundError as error:
        raise InputError(f"{named}: the Hub has no revision {revision!r} of {repo_id}") from error
    except hub_errors.RepositoryNotFoundError as error:  # also gated and private repositories without a token
        raise InputError(f"{named}: no such model directory, and no Hub repository {repo_id} this token can read "
                         "(for a private or gated one: HF_TOKEN or `hf auth login`)") from error
    except hub_errors.HfHubHTTPError as error:
        raise InputError(f"{named}: the Hub refused the download ({str(error).splitlines()[0][:200]})") from error
